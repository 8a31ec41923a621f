"""How MoLE-Flow's cost grows with the number of tasks: continual runs of 2, 5 and 15 tasks, side by side.

For each task count the script runs ``moleflow continual``'s engine on generated tasks (the five demo categories,
repeated with other data seeds when more tasks are asked for) and prints, from the run's own timing:

- training time and the time of the task x task test matrix, and (train + matrix) / train;
- inference ms per image of the final model (routing over every task) beside the backbone pass alone;
- parameters and bytes added per task, beside one anomalib Fastflow (what a separate model per task adds).

It measures, it never asserts::

    python scripts/benchmarks/task_scaling.py                        # tiny random ResNet-18, 64 px, CPU
    python scripts/benchmarks/task_scaling.py --tasks 2 5 15 --backbone wide_resnet50_2 --layers layer2 layer3 \\
        --pre_trained 1 --image_size 224 --embed_dim 768 --lora_rank 64 --epochs 60 --flow_layout joint \
        --accelerator gpu                                            # the study's MAIN size (our layout: no flag)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 15])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2"])
    parser.add_argument("--pre_trained", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--embed_dim", type=int, default=64)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument(
        "--flow_layout", choices=["joint", "stage"], default=None, help="MoLE-Flow's flow_layout (default: the model's)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n_train", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def make_tasks(root: Path, count: int, args: argparse.Namespace) -> list[Any]:
    """``count`` generated tasks: the demo categories, then again with other data seeds."""
    from anomalib_moleflow.data import SyntheticMVTecAD, Task
    from anomalib_moleflow.data.synthetic import DEMO_CATEGORIES

    tasks = []
    for index in range(count):
        category, repeat = DEMO_CATEGORIES[index % len(DEMO_CATEGORIES)], index // len(DEMO_CATEGORIES)
        datamodule = SyntheticMVTecAD(
            root=root / f"seed{repeat}",
            category=category,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=4,
            n_test_defect=1,
            data_seed=repeat,
            train_batch_size=args.batch_size,
            eval_batch_size=16,
            num_workers=0,
        )
        tasks.append(Task(f"{category}_{repeat}", datamodule))
    return tasks


def main(argv: list[str] | None = None) -> None:
    """Run and print the table."""
    args = parse_args(argv)
    import torch
    from lightning.pytorch import seed_everything

    from anomalib_moleflow import MoleFlow
    from anomalib_moleflow.baselines import TimmFastflow, non_backbone_size
    from anomalib_moleflow.benchmark.measure import inference_ms_per_image, resolve_device, sample_images
    from anomalib_moleflow.engine import ContinualEngine
    from anomalib_moleflow.runtime import torch_threads

    device = resolve_device(args.accelerator)
    settings = {
        "backbone": args.backbone,
        "layers": args.layers,
        "pre_trained": bool(args.pre_trained),
        "image_size": args.image_size,
    }
    rows = []
    with tempfile.TemporaryDirectory() as work, torch_threads(args.threads):
        fastflow = TimmFastflow(**settings, visualizer=False)
        fastflow_params, fastflow_bytes = non_backbone_size(fastflow.model, fastflow.backbone_module())
        for count in args.tasks:
            seed_everything(0, verbose=False)
            tasks = make_tasks(Path(work) / "data", count, args)
            model = MoleFlow(
                **settings,
                embed_dim=args.embed_dim,
                lora_rank=args.lora_rank,
                max_epochs=args.epochs,
                visualizer=False,
                **({} if args.flow_layout is None else {"flow_layout": args.flow_layout}),
            )
            engine = ContinualEngine(
                output_dir=Path(work) / f"run{count}",
                accelerator=args.accelerator,
                enable_progress_bar=False,
                overlays_per_task=0,
            )
            results = engine.run(model, tasks)
            train = sum(results["timing"]["fit_s"].values())
            matrix = sum(results["timing"]["test_s"].values())
            images = sample_images([tasks[0].datamodule], args.image_size, per_task=32)
            ms = inference_ms_per_image(model, images, 16, device)
            backbone = torch.nn.Sequential(model.pre_processor, model.model.feature_extractor)
            floor = inference_ms_per_image(backbone, images, 16, device)
            per_task = results["params"]["per_task"]
            rows.append(
                {
                    "tasks": count,
                    "train_s": train,
                    "matrix_s": matrix,
                    "ms": ms,
                    "floor": floor,
                    "params": sum(t["params"] for t in per_task) / len(per_task),
                    "bytes": sum(t["bytes"] for t in per_task) / len(per_task),
                    "routing": results["routing_accuracy"]["overall"],
                }
            )
            print(f"{count} tasks done", flush=True)
    print(
        "\n| tasks | train (s) | test matrix (s) | (train + matrix) / train | ms/image | backbone alone | "
        "ms / backbone | params added per task | bytes per task |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['tasks']} | {row['train_s']:.1f} | {row['matrix_s']:.1f} | "
            f"{(row['train_s'] + row['matrix_s']) / row['train_s']:.2f} | {row['ms']:.2f} | {row['floor']:.2f} | "
            f"{row['ms'] / row['floor']:.2f} | {row['params'] / 1e3:.1f}k | {row['bytes'] / 2**20:.2f} MiB |"
        )
    first, last = rows[0], rows[-1]
    print(
        f"\nInference from {first['tasks']} to {last['tasks']} tasks: x{last['ms'] / first['ms']:.2f}. "
        f"Per task vs one anomalib Fastflow ({fastflow_params / 1e3:.1f}k parameters, "
        f"{fastflow_bytes / 2**20:.2f} MiB): {100 * last['params'] / fastflow_params:.1f} % of its parameters."
    )


if __name__ == "__main__":
    main()
