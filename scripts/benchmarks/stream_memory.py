"""Resident memory while a trained two-task MoLE-Flow scores a long stream of images in batches.

The model learns two generated categories, then scores ``--images`` images (the categories' test images with fresh
noise each time, so no two batches are equal) through anomalib's full inference path (pre-process, route, score,
per-task post-process) while a routing log records every image, as in a test run. The script prints the memory
curve and the growth after warm-up; a leak shows as growth that keeps rising with the number of images:

    python scripts/benchmarks/stream_memory.py                  # 10,000 images, tiny random backbone, CPU
    python scripts/benchmarks/stream_memory.py --backbone tf_efficientnet_lite0 --layers blocks.2 blocks.4 \
        --pre_trained 1

It measures, it never asserts (not a test); the issue's target is growth under 5 % after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    """Current resident set size in MiB (Linux ``/proc``; peak RSS elsewhere)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="images to score")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2"])
    parser.add_argument("--pre_trained", type=int, default=0, help="1: ImageNet weights, 0: random")
    parser.add_argument("--points", type=int, default=20, help="memory samples along the stream")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, stream, print the curve."""
    args = parse_args(argv)
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_moleflow import MoleFlow
    from anomalib_moleflow.data import SyntheticMVTecAD
    from anomalib_moleflow.runtime import torch_threads

    seed_everything(0, verbose=False)
    categories = ("woven", "pill")
    with tempfile.TemporaryDirectory() as work, torch_threads(args.threads):
        model = MoleFlow(
            backbone=args.backbone,
            layers=args.layers,
            pre_trained=bool(args.pre_trained),
            image_size=args.image_size,
            num_coupling_layers=2,
            dia_blocks=1,
            lora_rank=4,
            max_epochs=1,
            visualizer=False,
        )
        images = []
        for index, category in enumerate(categories):
            datamodule = SyntheticMVTecAD(
                root=Path(work) / "data", category=category, image_size=args.image_size, n_train=16, num_workers=0
            )
            model.add_task(category)
            engine = Engine(
                default_root_dir=Path(work) / f"fit{index}",
                enable_progress_bar=False,
                enable_model_summary=False,
                logger=False,
            )
            engine.fit(model, datamodule=datamodule)
            images += [batch.image for batch in datamodule.test_dataloader()]
        pool = torch.cat(images)
        model.eval()
        every = max(1, args.images // args.batch_size // args.points)
        curve: list[tuple[int, float]] = []
        scored = 0
        start = time.perf_counter()
        with torch.no_grad(), model.record_routing() as log:
            for step in range(0, args.images, args.batch_size):
                index = torch.randint(len(pool), (min(args.batch_size, args.images - step),))
                batch = (pool[index] + 0.02 * torch.randn_like(pool[index])).clamp(0, 1)
                model(batch)
                scored += batch.shape[0]
                if (step // args.batch_size) % every == 0:
                    gc.collect()
                    curve.append((scored, rss_mib()))
        gc.collect()
        curve.append((scored, rss_mib()))
        seconds = time.perf_counter() - start
    warm = curve[len(curve) // 10 or 1][1]  # after the first tenth of the stream
    print("| images scored | RSS (MiB) |")
    print("|---|---|")
    for count, mib in curve:
        print(f"| {count} | {mib:.1f} |")
    growth = 100 * (curve[-1][1] - warm) / warm
    print(
        f"\n{scored} images in {seconds:.0f} s ({scored / seconds:.0f} images/s); routed: {len(log.tasks())}. "
        f"RSS after warm-up {warm:.1f} MiB, at the end {curve[-1][1]:.1f} MiB: growth {growth:+.2f} % (target < 5 %)."
    )


if __name__ == "__main__":
    main()
