"""How far unknown products lie from the router's tasks, in units of each task's threshold.

Every product of a task list is left out in turn: the router learns the others (prototype and threshold from their
training images, as in training), then every test image gets m = min over tasks of distance / threshold. An image is
flagged as an unknown product when m > ``unknown_factor``. The table shows, per left-out product, the largest m of
the learned products' test images, the smallest m of the left-out product's images, and for several factors the
share of learned test images flagged (false alarms) and of left-out images flagged (detections)::

    python scripts/experiments/unknown_products.py --config configs/benchmark/quality.yaml [--embedding max]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from anomalib_moleflow.baselines import TaskRouter
from anomalib_moleflow.data import build_tasks
from anomalib_moleflow.models import MoleFlow
from anomalib_moleflow.runtime import torch_threads


def embeddings(router: TaskRouter, datamodule: object, split: str, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Image embeddings ``(n, d)`` of one split's images, and their paths."""
    transform = MoleFlow.configure_pre_processor((image_size, image_size)).transform
    loader = getattr(datamodule, f"{split}_dataloader")()
    batches = [(router.embed(transform(batch.image)), list(batch.image_path)) for batch in loader]
    return torch.cat([embedded for embedded, _ in batches]), [path for _, paths in batches for path in paths]


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="A benchmark config (its backbone, layers and tasks).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--embedding", default=None, help="router_embedding (default: the config's, else the model's)")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    tasks = build_tasks(config["tasks"])
    patch_size = config.get("moleflow", {}).get("patch_size", 1)
    # --embedding, else the config's, else the router's own default
    embedding = args.embedding or config.get("moleflow", {}).get("router_embedding")
    router = TaskRouter(
        config["backbone"],
        config["layers"],
        config.get("pre_trained", True),
        patch_size=patch_size,
        **({"embedding": embedding} if embedding else {}),
    )
    with torch_threads(args.threads):
        train, test = {}, {}
        for task in tasks:
            task.datamodule.prepare_data()
            task.datamodule.setup()
            train[task.name] = embeddings(router, task.datamodule, "train", config["image_size"])
            test[task.name], _ = embeddings(router, task.datamodule, "test", config["image_size"])
        factors = (1.5, 2.0, 3.0, 5.0)
        head = " | ".join(f"flagged at {f:g}: learned / left out" for f in factors)
        print(f"| left out | learned: largest m | left out: smallest m | {head} |")
        print("|---|---|---|" + "---|" * len(factors))
        for left_out in train:
            learned = [name for name in train if name != left_out]
            router.router.prototypes = torch.nn.ModuleList()
            for name in learned:
                router.router.add_task()
                # keyed by path, as in training: the threshold's held-out folds do not follow the loader's shuffling
                router.router.prototypes[-1].accumulate(*train[name])
                router.router.finalize(len(router.router.prototypes) - 1)
            thresholds = torch.stack([p.threshold for p in router.router.prototypes]).double()

            def ratio(x: torch.Tensor, thresholds: torch.Tensor = thresholds) -> torch.Tensor:
                # each task's own metric, as the model's test (the pooled one decides only the route)
                return (router.router.own_distances(x).double() / thresholds).min(dim=1).values

            inside = torch.cat([ratio(test[name]) for name in learned])
            outside = ratio(test[left_out])
            rates = " | ".join(
                f"{100 * (inside > f).double().mean():.1f} % / {100 * (outside > f).double().mean():.1f} %"
                for f in factors
            )
            print(f"| {left_out} | {inside.max():.2f} | {outside.min():.2f} | {rates} |", flush=True)


if __name__ == "__main__":
    main()
