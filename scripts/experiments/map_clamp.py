"""How much pixel AUROC does anomalib's normalised map lose to its clamp? (issue 20, step 3; docs/quality.md 0j)

A research script, not a test. anomalib's post-processor maps each pixel to ``(value - threshold) / (max - min) + 0.5``
with the task's validation threshold and range, clipped to [0, 1], and its pixel metrics read that map: every pixel
below ``threshold - (max - min) / 2`` becomes 0, a tie. Pixel AP lives at the top of the ranking and does not see it;
pixel AUROC does, wherever defect pixels fall into the tie. This loads a trained continual checkpoint with each
``anomaly_map_value``, fits each masked product's statistics on its validation images (as the benchmark does, with the
true task), and reports pixel AUROC / AP of the raw and of the post-processed map, and the share of good and of
defect pixels the clamp sets to 0.

    python scripts/experiments/map_clamp.py --checkpoint results/quality/seed_2/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import auroc_ap, checkpoint_parser, datasets, load_split

from anomalib_moleflow.runtime import pick_threads

VALUES = ("score", "likelihood")


def main() -> None:
    from anomalib.engine import Engine

    from anomalib_moleflow import MoleFlow, OracleRouting

    parser = checkpoint_parser(__doc__.splitlines()[0], data="real")
    args = parser.parse_args()
    torch.set_num_threads(pick_threads())
    print("| product | map value | pix AUROC raw / normalised | pix AP raw / normalised | good / defect pixels at 0 |")
    print("|---|---|---|---|---|")
    for value in VALUES:
        model = MoleFlow.load_from_checkpoint(args.checkpoint, map_location="cpu", anomaly_map_value=value).eval()
        for name, datamodule in datasets(args.data, args.root).items():
            task = model.task_names.index(name)
            seed_everything(0, verbose=False)
            engine = Engine(logger=False, enable_progress_bar=False, callbacks=[OracleRouting(task)])
            engine.validate(model, datamodule=datamodule, verbose=False)
            split = load_split(datamodule, args.image_size)
            raw, final = [], []
            with torch.no_grad():
                for images in split["test"].split(32):
                    scored = model.score_images(images, tasks=task, pre_process=False)
                    raw.append(scored.raw.anomaly_map[:, 0])
                    final.append(scored.final.anomaly_map[:, 0])
            raw_map, final_map, mask = torch.cat(raw), torch.cat(final), split["mask"]
            (auroc_raw, ap_raw), (auroc_final, ap_final) = auroc_ap(mask, raw_map), auroc_ap(mask, final_map)
            zero = final_map == 0
            good_zero, defect_zero = zero[~mask].float().mean(), zero[mask].float().mean()
            print(
                f"| {name} | {value} | {100 * auroc_raw:.2f} / {100 * auroc_final:.2f} | "
                f"{100 * ap_raw:.2f} / {100 * ap_final:.2f} | {100 * good_zero:.1f} % / {100 * defect_zero:.1f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
