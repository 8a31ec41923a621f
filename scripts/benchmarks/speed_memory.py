"""Training time per epoch, inference ms/image and peak memory: MoLE-Flow vs anomalib's Fastflow and Patchcore.

All three learn the same generated demo category (one task) with the same backbone, stages and image size, each in
its own child process (so peak memory is the model's own), then the script prints the ratios MoLE-Flow / baseline:

    python scripts/benchmarks/speed_memory.py --threads 1  # tf_efficientnet_lite0 (offline ImageNet weights), CPU
    python scripts/benchmarks/speed_memory.py --backbone wide_resnet50_2 --layers layer2 layer3 --image_size 224  # GPU

Training time per epoch counts the training batches only (not the validation anomalib runs after each epoch), the
first epoch apart from the later ones (MoLE-Flow's later epochs reuse the cached backbone features); the backbone
pass alone, on the same images, is the floor of inference;
inference is anomalib's full path (pre-process, score, post-process) on the category's test images, after one
warm-up batch, the fastest of three passes. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, resident-set
growth on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("moleflow", "fastflow", "patchcore")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="./datasets/moleflow_demo_speed", help="generated data folder")
    parser.add_argument("--category", default="woven")
    parser.add_argument("--n_train", type=int, default=32)
    parser.add_argument("--data_size", type=int, default=128, help="side of the generated images")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--pre_trained", type=int, default=1, help="1: ImageNet weights, 0: random")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the flows (Patchcore: 1)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--embed_dim", type=int, default=128, help="MoLE-Flow's D")
    parser.add_argument("--lora_rank", type=int, default=16, help="MoLE-Flow's LoRA rank")
    parser.add_argument("--compile_mode", default="off", help="MoLE-Flow's compile_mode (torch.compile)")
    parser.add_argument(
        "--flow_layout", choices=["joint", "stage"], default=None, help="MoLE-Flow's flow_layout (default: the model's)"
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    parser.add_argument("--output", default=None, help="write the measurements as JSON here")
    parser.add_argument("--worker", choices=MODELS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def datamodule(args: argparse.Namespace) -> Any:
    from anomalib_moleflow.data import SyntheticMVTecAD

    return SyntheticMVTecAD(
        root=args.root,
        category=args.category,
        image_size=args.data_size,
        n_train=args.n_train,
        n_test_good=8,
        n_test_defect=2,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
    )


def build(name: str, args: argparse.Namespace) -> Any:
    shared = {
        "backbone": args.backbone,
        "layers": tuple(args.layers),
        "pre_trained": bool(args.pre_trained),
        "image_size": args.image_size,
        "visualizer": False,
    }
    if name == "moleflow":
        from anomalib_moleflow import MoleFlow

        return MoleFlow(
            **shared,
            embed_dim=args.embed_dim,
            lora_rank=args.lora_rank,
            max_epochs=args.epochs,
            compile_mode=args.compile_mode,
            **({} if args.flow_layout is None else {"flow_layout": args.flow_layout}),
        )
    if name == "fastflow":
        from anomalib_moleflow.baselines import TimmFastflow

        return TimmFastflow(**shared, max_epochs=args.epochs)
    from anomalib_moleflow.baselines import TimmPatchcore

    return TimmPatchcore(**shared)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train and time one model (runs in a child process)."""
    import torch
    from anomalib.callbacks import ModelCheckpoint
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from anomalib_moleflow.benchmark.measure import (
        PeakMemory,
        inference_ms_per_image,
        release_large_frees,
        resolve_device,
        sample_images,
    )

    class EpochTimer(Callback):
        """Seconds of each training epoch, up to the validation anomalib runs at its end."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.seconds: list[float] = []

        def _stop(self) -> None:
            if self.start is not None:
                self.seconds.append(time.perf_counter() - self.start)
                self.start = None

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.state.fn == "fit":
                self._stop()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._stop()

    release_large_frees()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.accelerator)
    data = datamodule(args)
    data.prepare_data()
    data.setup()
    images = sample_images([data], args.image_size, per_task=10_000)
    seed_everything(0, verbose=False)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as folder, PeakMemory(device) as memory:
        model = build(args.worker, args)
        engine = Engine(
            default_root_dir=folder,
            logger=False,
            accelerator=args.accelerator,
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(save_top_k=0), timer],
        )
        engine.fit(model, datamodule=data)
        ms = inference_ms_per_image(model, images, args.batch_size, device)
        backbone_alone = torch.nn.Sequential(model.pre_processor, model.model.feature_extractor)
        floor = inference_ms_per_image(backbone_alone, images, args.batch_size, device)
    later = timer.seconds[1:]
    return {
        "model": args.worker,
        "train_s_per_epoch": sum(timer.seconds) / max(1, len(timer.seconds)),
        "first_epoch_s": timer.seconds[0] if timer.seconds else float("nan"),
        "later_epoch_s": sum(later) / len(later) if later else float("nan"),
        "backbone_ms_per_image": floor,
        "epochs": len(timer.seconds),
        "inference_ms_per_image": ms,
        "peak_memory_mib": memory.peak_mib,
        "memory_kind": memory.kind,
        "images": int(images.shape[0]),
    }


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The settings, as options for a worker process."""
    options: list[str] = []
    for key, value in vars(args).items():
        if key in {"output", "worker", "result"} or value is None:
            continue
        options += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0
    datamodule(args).prepare_data()  # generate the data once, before the workers read it
    passthrough = worker_argv(args)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            result = Path(folder) / f"{name}.json"
            command = [sys.executable, __file__, *passthrough, "--worker", name, "--result", str(result)]
            print(f"running {name} ...", flush=True)
            completed = subprocess.run(command, check=False, capture_output=True, text=True)
            if completed.returncode != 0 or not result.exists():
                print(f"{name} failed:\n{completed.stderr[-3000:]}", file=sys.stderr)
                continue
            results[name] = json.loads(result.read_text())
    print(
        "| model | first epoch (s) | later epochs (s) | later / first | ms/image | backbone alone ms/image | "
        "ms/image / backbone | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, values in results.items():
        print(
            f"| {name} | {values['first_epoch_s']:.2f} | {values['later_epoch_s']:.2f} | "
            f"{values['later_epoch_s'] / values['first_epoch_s']:.2f} | {values['inference_ms_per_image']:.1f} | "
            f"{values['backbone_ms_per_image']:.1f} | "
            f"{values['inference_ms_per_image'] / values['backbone_ms_per_image']:.2f} | "
            f"{values['peak_memory_mib']:.1f} |"
        )
    kind = next(iter(results.values()))["memory_kind"] if results else "-"
    print(f"(peak memory: {kind}; {args.backbone} {'/'.join(args.layers)}, {args.image_size} px)")
    if "moleflow" in results:
        reference = results["moleflow"]
        for name in ("fastflow", "patchcore"):
            if name in results:
                other = results[name]
                ratios = {
                    key: reference[key] / other[key] if other[key] else float("nan")
                    for key in ("train_s_per_epoch", "inference_ms_per_image", "peak_memory_mib")
                }
                print(
                    f"MoLE-Flow / {name}: train per epoch x{ratios['train_s_per_epoch']:.2f}, "
                    f"inference x{ratios['inference_ms_per_image']:.2f}, peak memory x{ratios['peak_memory_mib']:.2f}"
                )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    return 0 if len(results) == len(MODELS) else 1


if __name__ == "__main__":
    sys.exit(main())
