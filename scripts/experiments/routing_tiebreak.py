"""Can the experts' likelihoods decide between two look-alike products? (issue 20, step 4)

A research script, not a test. It loads a trained continual checkpoint, scores every test image of two tasks with
both tasks' experts, and routes by a tie-break: when those two tasks are the nearest prototypes and the second is
within ``margin`` times the nearest distance, the image goes to the expert that finds it more normal (its raw score, or
its score normalised by each task's own statistics). Prints the routing accuracy per task and rule.

    python scripts/experiments/routing_tiebreak.py --checkpoint results/quality/seed_0/rows/moleflow/model.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import checkpoint_parser, datasets, load_checkpoint, load_split

from anomalib_moleflow import MoleFlow

Row = tuple[int, torch.Tensor, dict[int, float], dict[int, float]]


def score_rows(model: MoleFlow, pair: tuple[int, int], data: str, root: Path, image_size: int) -> list[Row]:
    """Per test image of the pair's tasks: its true task, its router distances, and each expert's raw and
    normalised score."""
    rows = []
    for name, datamodule in datasets(data, root).items():
        split = load_split(datamodule, image_size)
        truth = model.task_names.index(name)
        with torch.no_grad():
            for images in split["test"].split(32):
                patches, _ = model.model.embed(images)
                distances = model.model.router.distances(model.model.router.embed(patches))
                raw, normalised = {}, {}
                for task in pair:
                    tasks = torch.full((len(images),), task)
                    predictions, _ = model.model.score_patches(patches, tasks, (image_size, image_size))
                    raw[task] = predictions.pred_score
                    normalised[task] = model.post_processor(predictions, task_ids=tasks, unknown=None).pred_score
                for i in range(len(images)):
                    scores = ({t: float(v[i]) for t, v in raw.items()}, {t: float(v[i]) for t, v in normalised.items()})
                    rows.append((truth, distances[i], *scores))
    return rows


def accuracy(rows: list[Row], pair: tuple[int, int], rule: str, margin: float) -> dict[int, float]:
    """Routing accuracy per true task under ``rule`` (``nearest``, ``raw`` or ``normalised``)."""
    right: dict[int, list[bool]] = {task: [] for task in pair}
    for truth, distances, raw, normalised in rows:
        order = distances.argsort().tolist()
        pick = order[0]
        tied = set(order[:2]) == set(pair) and distances[order[1]] <= margin * distances[order[0]]
        if rule != "nearest" and tied:
            scores = raw if rule == "raw" else normalised
            pick = min(pair, key=lambda task: scores[task])
        right[truth].append(pick == truth)
    return {task: 100 * sum(r) / len(r) for task, r in right.items()}


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="elpv_bench")  # one family: the two look-alike tasks
    parser.add_argument("--margins", default="1.1,1.25,1.5,2,1e9")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint)
    names = list(datasets(args.data, args.root))
    pair = (model.task_names.index(names[0]), model.task_names.index(names[1]))
    rows = score_rows(model, pair, args.data, args.root, args.image_size)
    print(f"| rule, margin | {' | '.join(names)} |\n|---|---|---|")
    print(f"| nearest prototype | {' | '.join(f'{a:.2f}' for a in accuracy(rows, pair, 'nearest', 1).values())} |")
    for rule in ("raw", "normalised"):
        for margin in (float(m) for m in args.margins.split(",")):
            cells = " | ".join(f"{a:.2f}" for a in accuracy(rows, pair, rule, margin).values())
            print(f"| {rule} score, {margin:g} | {cells} |")


if __name__ == "__main__":
    main()
