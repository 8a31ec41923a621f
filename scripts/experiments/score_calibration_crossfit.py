"""Unbiased calibration statistics without holding images out of the flow: cross-fitting (issue 20; quality.md 0i).

A research script, not a test. ``score_calibration: position`` fits each position's mean and std of the patch NLL on the
task's training images, which its expert has fitted (biased low and narrow); ``held_out`` removes the bias but trains
the expert on 80 % of the images and lost more than it gained. Cross-fitting keeps every image in the expert: *fold
experts* are trained on the frozen base (``--folds``, 2 by default: each on one half of the task's training images) with
the task's own recipe (lr, epochs, batch, loss, the averaging of the last weights), each scoring the images it did not
see; the statistics are fitted on those out-of-fold NLLs and applied to the checkpoint's own expert. With two folds it
costs one more training of the task (two halves), with k folds k - 1 more. Each fold expert is a new task of the loaded
checkpoint (its base is frozen, so it is trained exactly as the product's own expert was); the checkpoint on disk is not
written.

Evaluated as ``score_calibration_heldout.py`` evaluates (its rows reproduce): the good test images split into two
folds, every score evaluated on the test images outside the fold, the mean of the two folds; the unseen-test-images
row is the diagnostic bound (the test images are not a calibration set).

    python scripts/experiments/score_calibration_crossfit.py --checkpoint <seed S's moleflow/model.ckpt>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import checkpoint_parser, flow_scores, load_checkpoint, train_flow
from score_calibration import raw_scores, standardise
from score_calibration_heldout import fold_rows


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embeddings ``(b, h, w, d)`` of pre-processed images, 32 at a time."""
    return torch.cat([model.embed(chunk)[0] for chunk in images.split(32)])


def out_of_fold_scores(
    module: object, train_images: torch.Tensor, name: str, seed: int, batch: int, epochs: int, folds: int
) -> torch.Tensor:
    """Each training image's patch NLLs ``(b, h, w)`` under the fold expert trained without its fold (every
    ``folds``-th image)."""
    model = module.model
    patches = embed(model, train_images)
    scores = torch.empty(patches.shape[:3])
    for fold in range(folds):
        held = torch.zeros(len(patches), dtype=torch.bool)
        held[fold::folds] = True
        torch.manual_seed(seed + fold)
        np.random.seed(seed + fold)
        task = model.add_task(f"{name}#fold{fold}")
        started = time.perf_counter()
        losses = train_flow(
            model,
            patches[~held],
            epochs,
            module.lr,
            batch,
            seed + fold,
            loss_fn=module.loss,
            task=task,
            average_from=1 - module.average_last if module.average_last > 0 else None,
        )
        scores[held] = flow_scores(model, patches[held], task)["nll"]
        print(
            f"{name}: fold expert {fold} trained on {int((~held).sum())} images, {epochs} epochs, "
            f"final loss {losses[-1]:.2f}, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return scores


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="real")
    parser.add_argument("--seed", type=int, default=0, help="the fold experts' seed (fold k uses seed + k)")
    parser.add_argument("--batch", type=int, default=8, help="the task's training batch (the benchmark's: 8)")
    parser.add_argument("--epochs", type=int, default=None, help="the fold experts' epochs (default: the task's)")
    parser.add_argument("--folds", type=int, default=2, help="fold experts per product, each without 1/folds")
    parser.add_argument("--categories", default="", help="only these products, comma-separated (default: all)")
    args = parser.parse_args()
    module = load_checkpoint(args.checkpoint)
    if len(module.model.paths) > 1:  # the fold experts are trained and scored on one flow's inputs (patch_score)
        parser.error("this experiment needs a checkpoint with one flow (flow_layout joint), as it was run on.")
    print("| product | statistics from | img AUROC | pix AUROC | pix AP |")
    print("|---|---|---|---|---|")
    for scored in raw_scores(args, module):
        if args.categories and scored.name not in args.categories.split(","):
            continue
        epochs = args.epochs or module.max_epochs
        images = scored.split["train"]
        cross = out_of_fold_scores(module, images, scored.name, args.seed, args.batch, epochs, args.folds)
        train, test = scored.train, scored.test
        for row in fold_rows(
            scored,
            args.image_size,
            lambda held, train=train, test=test, cross=cross: {
                "none (raw)": test,
                "training images, the expert's own NLLs (`position`)": standardise(test, train),
                f"training images, out-of-fold NLLs ({args.folds} folds)": standardise(test, cross),
                "unseen good test images (the bound)": standardise(test, test[held]),
            },
        ):
            print(row, flush=True)


if __name__ == "__main__":
    main()
