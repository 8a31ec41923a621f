"""Metrics per category of a trained continual checkpoint, whatever its tasks (issue 20, step 5).

A research script, not a test. A task of several categories (a product line) reports its metrics over its pooled
test set; this scores each category's test images on its own, through the model's routed path (router, the routed
expert, that task's normalisation), so a run with the categories as one task and a run with them as separate tasks
compare category by category.

    python scripts/experiments/per_category.py --checkpoint results/product_line/seed_0/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import checkpoint_parser, datasets, load_checkpoint, load_split

from anomalib_moleflow import MoleFlow


def category_metrics(model: MoleFlow, split: dict[str, torch.Tensor]) -> dict[str, float]:
    """Image AUROC, pixel AUROC and pixel AP (where there are masks) in %, and the share of images routed to each
    task."""
    scores, maps, tasks = [], [], []
    with torch.no_grad():
        for images in split["test"].split(32):
            raw, routed = model.model.predict(images)
            final = model.post_processor(raw, task_ids=routed.task, unknown=None)
            scores.append(final.pred_score.flatten())
            maps.append(final.anomaly_map.reshape(len(images), *images.shape[-2:]))
            tasks.append(routed.task)
    labels = split["label"]
    out = {"img AUROC": 100 * float(binary_auroc(torch.cat(scores), labels))}
    if "mask" in split:
        pixels, truth = torch.cat(maps).flatten(), split["mask"].flatten().long()
        out["pix AUROC"] = 100 * float(binary_auroc(pixels, truth))
        out["pix AP"] = 100 * float(binary_average_precision(pixels, truth))
    routed_to = torch.cat(tasks).bincount(minlength=model.model.num_tasks) / len(labels)
    out.update({f"to {name}": 100 * float(share) for name, share in zip(model.task_names, routed_to, strict=True)})
    return out


def main() -> None:
    args = checkpoint_parser(__doc__.splitlines()[0], data="elpv_bench,real").parse_args()
    model = load_checkpoint(args.checkpoint)
    print(f"tasks: {model.task_names}")
    for family in args.data.split(","):
        for name, datamodule in datasets(family, args.root).items():
            metrics = category_metrics(model, load_split(datamodule, args.image_size))
            cells = " | ".join(f"{key} {value:.2f}" for key, value in metrics.items())
            print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
