"""Is the per-position calibration's loss on MPDD the training images' bias? (issue 20, step 3; docs/quality.md 0i)

A research script, not a test. ``score_calibration: position`` standardises each position's patch NLL by its mean
and standard deviation over the task's *training* images, which the flow has fitted: their NLLs are lower and less
spread than an unseen good image's, and with few images (MPDD: 54) the bias may cost more than the calibration
gains. This scores a trained checkpoint raw (routed), then splits each product's good *test* images into two folds
by index; for each fold it fits the statistics on (a) the training images, (b) that fold's good images (unseen by
the flow), (c) both, and evaluates every score on the test images outside the fold. Metrics are the mean over the
two folds, on the same evaluation images for every row.

    python scripts/experiments/score_calibration_heldout.py --checkpoint results/quality/seed_0/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_upsampling import moleflow_patch_scores, to_map
from patch_score import auroc_ap, checkpoint_parser, datasets, load_checkpoint, load_split

from anomalib_moleflow.models.moleflow.anomaly_map import top_k_image_score


def standardise(scores: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """``scores`` ``(b, h, w)`` standardised by ``fit``'s per-position mean and std."""
    return (scores - fit.mean(0)) / fit.std(0).clamp_min(1e-6)


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="real")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint)
    model.model.score_calibration = "none"  # raw NLLs: every row calibrates them itself
    k = model.model.score_aggregation_top_k
    print("| product | statistics from | img AUROC | pix AUROC | pix AP |")
    print("|---|---|---|---|---|")
    products = {name: dm for family in args.data.split(",") for name, dm in datasets(family, args.root).items()}
    for name, datamodule in products.items():
        split = load_split(datamodule, args.image_size)
        train = moleflow_patch_scores(model, split["train"])
        test = moleflow_patch_scores(model, split["test"])
        good = torch.nonzero(split["label"] == 0).flatten()
        rows: dict[str, list[tuple[float, ...]]] = {}
        for fold in (0, 1):
            held = good[fold::2]
            keep = torch.ones(len(test), dtype=torch.bool)
            keep[held] = False
            variants = {
                "none (raw)": test,
                "training images (the default)": standardise(test, train),
                "held-out good test images": standardise(test, test[held]),
                "both": standardise(test, torch.cat([train, test[held]])),
            }
            for label, scores in variants.items():
                image = auroc_ap(split["label"][keep], top_k_image_score(scores[keep], k))[0]
                cells: tuple[float, ...] = (image,)
                if "mask" in split:
                    cells += auroc_ap(split["mask"][keep], to_map(scores[keep], args.image_size, "bilinear", 4.0))
                rows.setdefault(label, []).append(cells)
        for label, folds in rows.items():
            mean = [100 * sum(v) / len(v) for v in zip(*folds, strict=True)]
            cells_text = " | ".join(f"{v:.2f}" for v in mean) + (" | - | -" if len(mean) == 1 else "")
            print(f"| {name} ({len(good)} good test images) | {label} | {cells_text} |", flush=True)


if __name__ == "__main__":
    main()
