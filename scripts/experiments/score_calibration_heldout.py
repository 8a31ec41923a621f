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
from patch_score import checkpoint_parser
from score_calibration import metrics, raw_scores, standardise


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="real")
    args = parser.parse_args()
    print("| product | statistics from | img AUROC | pix AUROC | pix AP |")
    print("|---|---|---|---|---|")
    for name, split, train, test, top_k in raw_scores(args):
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
            kept = {key: split[key][keep] for key in ("label", "mask") if key in split}
            for label, scores in variants.items():
                rows.setdefault(label, []).append(metrics(kept, scores[keep], top_k, args.image_size))
        for label, folds in rows.items():
            mean = [sum(v) / len(v) for v in zip(*folds, strict=True)]
            cells = " | ".join(f"{v:.2f}" for v in mean) + " | - | -" * (len(mean) == 1)
            print(f"| {name} ({len(good)} good test images) | {label} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
