"""Does the anomaly map's construction carry Patchcore's pixel-AP lead? (issue 20, step 3)

A research script, not a test. anomalib's Patchcore upsamples its patch scores *nearest* (blocks of 8 x 8 pixels at
stride 8) before the Gaussian blur; MoLE-Flow upsamples bilinearly. This scores the same patch scores both ways and
with blurs of sigma 4 (anomalib's) and 2, for anomalib's Patchcore fitted on each real masked product and for a
trained continual MoLE-Flow checkpoint (routed), so the map's share of the gap is measured apart from the score's.

    python scripts/experiments/map_upsampling.py --checkpoint results/quality/seed_0/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import auroc_ap, checkpoint_parser, datasets, load_checkpoint, load_split

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator

#: (upsampling mode, blur sigma) of every map scored.
MAPS = (("nearest", 4.0), ("bilinear", 4.0), ("nearest", 2.0), ("bilinear", 2.0))


def to_map(patch_scores: torch.Tensor, size: int, mode: str, sigma: float) -> torch.Tensor:
    """``(b, h, w)`` patch scores to a ``(b, size, size)`` map: upsampled by ``mode``, then blurred by ``sigma``."""
    blur = AnomalyMapGenerator(sigma).blur  # MoLE-Flow's blur (anomalib's kernel), after either upsampling
    options = {"align_corners": False} if mode == "bilinear" else {}
    return blur(F.interpolate(patch_scores[:, None], size=(size, size), mode=mode, **options))[:, 0]


def pixel_aps(patch_scores: torch.Tensor, masks: torch.Tensor) -> list[float]:
    """Pixel AP in % of every map of :data:`MAPS`."""
    return [100 * auroc_ap(masks, to_map(patch_scores, masks.shape[-1], *spec))[1] for spec in MAPS]


def map_inputs(generator: nn.Module, predict: Callable[[torch.Tensor], object], images: torch.Tensor) -> torch.Tensor:
    """The patch scores ``(b, h, w)`` that ``predict`` hands its map ``generator`` (the first argument of its call)
    for ``images``, in batches of 32."""
    captured: list[torch.Tensor] = []
    hook = generator.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            for batch in images.split(32):
                predict(batch)
    finally:
        hook.remove()
    scores = torch.cat(captured)
    return scores[:, 0] if scores.dim() == 4 else scores  # anomalib's Patchcore: (b, 1, h, w)


def moleflow_patch_scores(model: MoleFlow, images: torch.Tensor) -> torch.Tensor:
    """Routed patch NLLs ``(b, h, w)`` of a continual MoLE-Flow (each image scored by the expert it is routed to)."""
    return map_inputs(model.model.anomaly_map_generator, model.model.predict, images)


def patchcore_patch_scores(
    split: dict[str, torch.Tensor], args: argparse.Namespace, count_include_pad: bool = True, bank: int | None = None
) -> torch.Tensor:
    """anomalib's Patchcore (the benchmark's settings) fitted on the split's training images; its patch scores.

    ``count_include_pad=False`` swaps its 3 x 3 feature average for one that ignores the zero padding (as
    MoLE-Flow's ``patch_size=3``): the two embeddings then differ only there. ``bank``: that many training patches
    drawn at random (seed 0) instead of the greedy coreset (which takes most of an hour on BSData on one core).
    """
    from anomalib_moleflow.baselines.patchcore import TimmPatchcore

    model = TimmPatchcore(
        backbone=args.backbone, layers=args.layers.split(","), image_size=args.image_size, coreset_sampling_ratio=0.01
    )
    inner = model.model.train()
    if not count_include_pad:
        inner.feature_pooler = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    with torch.no_grad():
        for batch in split["train"].split(32):
            inner(batch)
        if bank is None:
            inner.subsample_embedding(model.coreset_sampling_ratio)
        else:
            patches = torch.vstack(inner.embedding_store)
            inner.embedding_store.clear()
            drawn = torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:bank]
            inner.memory_bank = patches[drawn]
    inner.eval()
    return map_inputs(inner.anomaly_map_generator, inner, split["test"])


def patchcore_parser(description: str) -> argparse.ArgumentParser:
    """:func:`checkpoint_parser` (masked real products by default) plus the Patchcore's ``--backbone`` and
    ``--layers``."""
    parser = checkpoint_parser(description, data="real")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.2,blocks.4")
    return parser


def masked_splits(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(product, split)`` of every product of ``--data`` that has pixel masks (the others are named and skipped)."""
    for family in args.data.split(","):
        for name, datamodule in datasets(family, args.root).items():
            split = load_split(datamodule, args.image_size)
            if "mask" in split:
                yield name, split
            else:
                print(f"{name}: no pixel masks, skipped.")


def main() -> None:
    parser = patchcore_parser(__doc__.splitlines()[0])
    parser.add_argument("--patchcore", action="store_true", help="also fit anomalib's Patchcore on each product")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint)
    header = " | ".join(f"{mode} sigma={sigma:g}" for mode, sigma in MAPS)
    print(f"| product | score | {header} |\n|---|---|{'---|' * len(MAPS)}")
    for name, split in masked_splits(args):
        rows = [("MoLE-Flow (routed)", moleflow_patch_scores(model, split["test"]))]
        if args.patchcore:
            rows.append(("anomalib Patchcore (1 %)", patchcore_patch_scores(split, args)))
        for label, scores in rows:
            cells = " | ".join(f"{ap:.2f}" for ap in pixel_aps(scores, split["mask"]))
            print(f"| {name} | {label} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
