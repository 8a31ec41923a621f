"""Speed of the deployed path: the exported model (ONNX Runtime, OpenVINO) beside the PyTorch model, 1 and 15 tasks.

A MoLE-Flow model with N tasks (random experts, router prototypes and normalisation statistics: speed does not depend
on the weights' values) is exported with ``moleflow export``'s code, then every runtime scores the same images,
routing, scoring and normalising each (the loader's ``run``, the PyTorch model's ``score_images``). The backbone pass
alone is the floor. It measures, it never asserts::

    python scripts/benchmarks/deploy_speed.py --threads 2                       # lite0 (offline weights), 224 px, CPU
    python scripts/benchmarks/deploy_speed.py --backbone wide_resnet50_2 --layers layer2 layer3 --embed_dim 768 \\
        --lora_rank 64 --flow_layout joint --device cuda                        # the study's MAIN model on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--pre_trained", type=int, default=1, help="1: ImageNet weights, 0: random")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--embed_dim", type=int, default=None, help="D (default: from the backbone)")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument(
        "--flow_layout", choices=["joint", "stage"], default=None, help="MoLE-Flow's flow_layout (default: the model's)"
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 15])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=32, help="images scored per measurement")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch / runtime CPU threads")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, num_tasks: int) -> Any:
    """A MoLE-Flow model with ``num_tasks`` random tasks, ready to score (router fitted, statistics set)."""
    import torch

    from anomalib_moleflow import MoleFlow
    from anomalib_moleflow.models.moleflow.post_processor import STAT_COLUMNS

    torch.manual_seed(0)
    model = MoleFlow(
        backbone=args.backbone,
        layers=tuple(args.layers),
        pre_trained=bool(args.pre_trained),
        image_size=args.image_size,
        embed_dim=args.embed_dim,
        lora_rank=args.lora_rank,
        visualizer=False,
        **({} if args.flow_layout is None else {"flow_layout": args.flow_layout}),
    ).eval()
    with torch.no_grad():
        _, embedding = model.model.embed(model.pre_processor(torch.rand(8, 3, args.image_size, args.image_size)))
        for task in range(num_tasks):
            model.add_task(f"product_{task:02d}")
            for parameter in model.model.task_parameters(task):
                parameter.add_(0.01 * torch.randn_like(parameter))
            prototype = model.model.router.prototypes[task]
            prototype.accumulate(embedding.repeat(4, 1) + 0.1 * torch.randn(32, embedding.shape[1]) + task)
            model.model.router.finalize(task)
        raw, _ = model.model.predict(model.pre_processor(torch.rand(4, 3, args.image_size, args.image_size)))
        low, high = float(raw.pred_score.min()), float(raw.pred_score.max()) + 1.0
        row = dict.fromkeys(STAT_COLUMNS, (low + high) / 2) | {"image_min": low, "image_max": high}
        row |= {"pixel_min": float(raw.anomaly_map.min()), "pixel_max": float(raw.anomaly_map.max()) + 1.0}
        model.post_processor.task_stats[:] = torch.tensor([row[column] for column in STAT_COLUMNS])
    return model


def ms_per_image(run: Callable[[Any], Any], batches: list[Any], images: int) -> float:
    """Mean milliseconds per image over ``batches`` after two warm-up batches."""
    for batch in batches[:2]:
        run(batch)
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return (time.perf_counter() - start) * 1000 / images


def measure(args: argparse.Namespace, num_tasks: int, folder: Path) -> list[tuple[int, int, str, float, float]]:
    """Rows ``(tasks, batch, runtime, ms per image, ratio to PyTorch)`` of a model with ``num_tasks`` tasks."""
    import torch

    from anomalib_moleflow.deploy.inferencer import RoutedInferencer  # the loader the export copies beside the model
    from anomalib_moleflow.engine.export import export_model

    model = build_model(args, num_tasks)
    exports = {"ONNX Runtime": export_model(model, folder / f"onnx_{num_tasks}", "onnx")}
    if importlib.util.find_spec("openvino") is not None:
        exports["OpenVINO"] = export_model(model, folder / f"openvino_{num_tasks}", "openvino")
    device = torch.device(args.device)
    model = model.to(device)
    inferencers = {
        name: RoutedInferencer(path, "GPU" if args.device == "cuda" else "CPU") for name, path in exports.items()
    }
    rows = []
    for batch_size in args.batch_sizes:
        count = max(batch_size, args.images // batch_size * batch_size)
        batches = list(torch.rand(count, 3, args.image_size, args.image_size).split(batch_size))
        with torch.no_grad():
            on_device = [batch.to(device) for batch in batches]
            measured = {
                "backbone pass": ms_per_image(lambda b: model.model.embed(model.pre_processor(b)), on_device, count),
                "PyTorch": ms_per_image(model.score_images, on_device, count),
            }
        for name, inferencer in inferencers.items():
            measured[name] = ms_per_image(inferencer.run, [batch.numpy() for batch in batches], count)
        rows += [(num_tasks, batch_size, name, value, value / measured["PyTorch"]) for name, value in measured.items()]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    from anomalib_moleflow.runtime import torch_threads

    rows = []
    with torch_threads(args.threads) as threads, tempfile.TemporaryDirectory() as folder:
        for num_tasks in args.tasks:
            rows += measure(args, num_tasks, Path(folder))
    print(f"\n{args.backbone} {args.layers}, {args.image_size} px, {args.device}, {threads} thread(s)\n")
    print("| tasks | batch | runtime | ms / image | images / s | x PyTorch |")
    print("|---|---|---|---|---|---|")
    for num_tasks, batch_size, name, value, ratio in rows:
        print(f"| {num_tasks} | {batch_size} | {name} | {value:.1f} | {1000 / value:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
