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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import checkpoint_parser
from score_calibration import Scored, metrics, raw_scores, standardise


def fold_rows(
    scored: Scored, image_size: int, variants: Callable[[torch.Tensor], dict[str, torch.Tensor]]
) -> Iterator[str]:
    """One markdown row per variant: ``variants(held)`` gives the test scores ``(b, h, w)`` of each variant for the
    good test images ``held`` (one of two folds by index); each is evaluated on the test images outside the fold,
    and the row is the mean of the two folds."""
    name, split, test, top_k = scored.name, scored.split, scored.test, scored.top_k
    good = torch.nonzero(split["label"] == 0).flatten()
    rows: dict[str, list[tuple[float, ...]]] = {}
    for fold in (0, 1):
        held = good[fold::2]
        keep = torch.ones(len(test), dtype=torch.bool)
        keep[held] = False
        kept = {key: split[key][keep] for key in ("label", "mask") if key in split}
        for label, scores in variants(held).items():
            rows.setdefault(label, []).append(metrics(kept, scores[keep], top_k, image_size))
    for label, folds in rows.items():
        mean = [sum(v) / len(v) for v in zip(*folds, strict=True)]
        cells = " | ".join(f"{v:.2f}" for v in mean) + " | - | -" * (len(mean) == 1)
        yield f"| {name} ({len(good)} good test images) | {label} | {cells} |"


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="real")
    args = parser.parse_args()
    print("| product | statistics from | img AUROC | pix AUROC | pix AP |")
    print("|---|---|---|---|---|")
    for scored in raw_scores(args):
        train, test = scored.train, scored.test
        for row in fold_rows(
            scored,
            args.image_size,
            lambda held, train=train, test=test: {
                "none (raw)": test,
                "training images (the default)": standardise(test, train),
                "held-out good test images": standardise(test, test[held]),
                "both": standardise(test, torch.cat([train, test[held]])),
            },
        ):
            print(row, flush=True)


if __name__ == "__main__":
    main()
