"""Is Patchcore's pixel-AP lead at the image border? (issue 20, step 3)

A research script, not a test. anomalib's Patchcore averages each stage's features over 3 x 3 with the zero padding
counted, so the outermost patches of every image are shrunk towards zero (by 2/3 on an edge, 4/9 in a corner), and
so are their nearest-neighbour distances; MoLE-Flow's embedding (and the harness's Patchcore, section 0e of
docs/quality.md) ignores the padding. This scores both Patchcores and a trained continual MoLE-Flow checkpoint
(routed) on each real masked product, over the whole image and without a border band, and reports where each
score's false positives lie.

    python scripts/experiments/border_patches.py --checkpoint results/quality/seed_2/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_upsampling import masked_splits, moleflow_patch_scores, patchcore_parser, patchcore_patch_scores, to_map
from patch_score import auroc_ap, load_checkpoint


def border_mask(size: int, band: int) -> torch.Tensor:
    """``(size, size)``: True within ``band`` pixels of the image's edge."""
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[band:-band, band:-band] = True
    return ~inside


def border_report(maps: torch.Tensor, masks: torch.Tensor, band: int) -> dict[str, float]:
    """Pixel AP over the image and inside the band, and the border's share of the top-1 % scored good pixels, in %."""
    border = border_mask(maps.shape[-1], band).expand_as(maps)
    good = maps[~masks]
    top = good >= good.kthvalue(int(0.99 * good.numel())).values  # torch.quantile refuses > 2**24 values
    return {
        "pix AP": 100 * auroc_ap(masks, maps)[1],
        "pix AP inside": 100 * auroc_ap(masks[~border], maps[~border])[1],
        "border share of top-1 % good pixels": 100 * float(border[~masks][top].float().mean()),
    }


def main() -> None:
    parser = patchcore_parser(__doc__.splitlines()[0])
    parser.add_argument("--band", type=int, default=16, help="border band in pixels (16: two patches at stride 8)")
    parser.add_argument("--bank", type=int, default=20000, help="random bank size; 0: anomalib's coreset (slow)")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint)
    bank = args.bank or None
    for name, split in masked_splits(args):
        masks = split["mask"]
        in_band = masks[border_mask(args.image_size, args.band).expand_as(masks)]
        print(f"{name}: {100 * float(in_band.sum() / masks.sum()):.1f} % of the defect pixels lie in the border band")
        rows = {
            "MoLE-Flow (routed)": moleflow_patch_scores(model, split["test"]),
            "anomalib Patchcore (zero padding counted: anomalib's)": patchcore_patch_scores(split, args, True, bank),
            "anomalib Patchcore (padding ignored: MoLE-Flow's)": patchcore_patch_scores(split, args, False, bank),
        }
        for label, scores in rows.items():
            report = border_report(to_map(scores, args.image_size, "bilinear", 4.0), masks, args.band)
            cells = " | ".join(f"{key} {value:.2f}" for key, value in report.items())
            print(f"| {name} | {label} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
