"""Does calibrating each position's score on the task's own training images help localisation? (issue 20, step 3)

A research script, not a test. A density scores a patch by how rare it is among *all* the task's patches, wherever
they lie; on an aligned product the same places (the part's rim, a bright fold) are rare in every image, normal ones
included, and they are the false positives that cost pixel AP. Padim's per-position Gaussian removes exactly that;
MoLE-Flow's positional code only shifts the features. This scores a trained continual checkpoint (routed) on each
product of the benchmark (pixel metrics where it has masks), then subtracts each grid position's mean patch NLL over
the task's training images (``shift``) or standardises by its mean and standard deviation (``z``) before the map and
the image score are made. On a product whose images are not aligned the position's mean is flat and the shift
changes nothing, so the calibration would be general, not fitted to one product.
Image score: the mean of the top-k patch scores, as the model's.

    python scripts/experiments/score_calibration.py --checkpoint results/quality/seed_2/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_upsampling import moleflow_patch_scores, to_map
from patch_score import auroc_ap, checkpoint_parser, datasets, load_checkpoint, load_split

from anomalib_moleflow.models.moleflow.anomaly_map import top_k_image_score

if TYPE_CHECKING:
    from anomalib_moleflow.models.moleflow.lightning_model import MoleFlow


def neighbourhood(statistic: torch.Tensor, size: int) -> torch.Tensor:
    """``(h, w)`` averaged over each position's ``size x size`` neighbourhood (the border's existing neighbours)."""
    pool = torch.nn.AvgPool2d(size, stride=1, padding=size // 2, count_include_pad=False)
    return pool(statistic[None, None])[0, 0]


def standardise(scores: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """``scores`` ``(b, h, w)`` standardised by ``fit``'s per-position mean and std."""
    return (scores - fit.mean(0)) / fit.std(0).clamp_min(1e-6)


def calibrations(train: torch.Tensor, test: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """The test patch scores ``(b, h, w)`` raw and calibrated by the training images' per-position statistics; the
    last rows pool each position's mean and variance with its neighbours' (more images per estimate, less noise)."""
    mean = train.mean(0)
    rows = {
        "raw (the model's)": test,
        "minus the position's training mean (shift)": test - mean,
        "standardised by the position's training mean and std (z)": standardise(test, train),
    }
    for size in (3, 5):
        pooled_mean = neighbourhood(mean, size)
        # the neighbourhood's images together: within-position variance plus the spread of the positions' means
        pooled_var = neighbourhood(train.var(0), size) + neighbourhood(mean.square(), size) - pooled_mean.square()
        pooled_std = pooled_var.clamp_min(1e-12).sqrt()
        rows[f"z, mean and variance pooled over {size} x {size} positions"] = (test - pooled_mean) / pooled_std
    # Fastflow's map value: the likelihood per dimension, -exp(-NLL / D), a concave map of the NLL that caps a few
    # patches' extreme scores before the map's upsampling and blur mix neighbouring patches
    saturated_train, saturated_test = -torch.exp(-train / dim), -torch.exp(-test / dim)
    rows["saturated, -exp(-NLL / D)"] = saturated_test
    rows["saturated, then standardised per position"] = standardise(saturated_test, saturated_train)
    # the likelihood relative to the position's typical one, exp(-(NLL - mean) / D): the shift's calibration, then the
    # same saturation (the scale stays the likelihood's own, per dimension: no statistic but the mean is fitted)
    rows["shifted per position, then saturated, -exp(-(NLL - mean) / D)"] = -torch.exp(-(test - mean) / dim)
    return rows


class Scored(NamedTuple):
    """One product's split and a checkpoint's raw routed patch NLLs ``(b, h, w)`` of its training and test images."""

    name: str
    split: dict[str, torch.Tensor]
    train: torch.Tensor
    test: torch.Tensor
    top_k: int  # the checkpoint's image score: the mean of its top-k patch scores
    dim: int  # the checkpoint's patch embedding width D


def raw_scores(args: argparse.Namespace, model: MoleFlow | None = None) -> Iterator[Scored]:
    """Each product of ``args.data``, scored raw by ``model`` (default: ``args.checkpoint`` loaded)."""
    model = model or load_checkpoint(args.checkpoint)
    model.model.score_calibration = "none"  # raw NLLs (a checkpoint of the default would calibrate them already)
    model.model.anomaly_map_value = "score"  # the map's input is then the NLL (not each patch's likelihood)
    products = {name: dm for family in args.data.split(",") for name, dm in datasets(family, args.root).items()}
    for name, datamodule in products.items():
        split = load_split(datamodule, args.image_size)
        train, test = (moleflow_patch_scores(model, split[part]) for part in ("train", "test"))
        yield Scored(name, split, train, test, model.model.score_aggregation_top_k, model.model.embed_dim)


def metrics(split: dict[str, torch.Tensor], scores: torch.Tensor, k: int, image_size: int) -> tuple[float, ...]:
    """Image AUROC (top-``k`` image score), then pixel AUROC and AP where ``split`` has masks, in %."""
    values = (auroc_ap(split["label"], top_k_image_score(scores, k))[0],)
    if "mask" in split:
        values += auroc_ap(split["mask"], to_map(scores, image_size, "bilinear", 4.0))
    return tuple(100 * value for value in values)


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="real,elpv_bench")
    args = parser.parse_args()
    print("| product | score | img AUROC | pix AUROC | pix AP | spread of the training mean over positions |")
    print("|---|---|---|---|---|---|")
    for name, split, train, test, top_k, dim in raw_scores(args):
        spread = train.mean(0)
        for label, scores in calibrations(train, test, dim).items():
            values = metrics(split, scores, top_k, args.image_size)
            cells = " | ".join(f"{v:.2f}" for v in values) + " | - | -" * (len(values) == 1)
            print(f"| {name} | {label} | {cells} | {float(spread.max() - spread.min()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
