"""Every benchmark in one command, one after the other (never in parallel), into one Markdown report.

    python scripts/benchmarks/run_all.py --device cuda                 # MVTec-sized: WRN50 layer2+3, 224 px, batch 16
    python scripts/benchmarks/run_all.py --device cpu --profile lite0  # lite0 at 160 px, D 152 (ImageNet weights: 1)
    python scripts/benchmarks/run_all.py --profile smoke               # tiny random ResNet-18: checks the wiring only

Runs ``speed_memory.py`` (epochs, inference, peak memory vs anomalib's Fastflow and Patchcore; then again with
``compile_mode default`` on a GPU), ``task_scaling.py`` (2, 5, 15 tasks), ``deploy_speed.py`` (exported model vs
PyTorch, 1 and 15 tasks) and ``stream_memory.py`` (memory over a long stream), prints each one's table and writes them
all to ``--output``. Backbone weights are random by default (``--pre_trained 1`` for ImageNet's): speed does not
depend on their values, and a machine without internet can run it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Model and data settings of each profile, as the scripts' own flags.
PROFILES: dict[str, dict[str, list[str]]] = {
    "mvtec": {
        "model": ["--backbone", "wide_resnet50_2", "--layers", "layer2", "layer3", "--image_size", "224"],
        "flow": ["--embed_dim", "768", "--lora_rank", "64"],
        "batch": ["--batch_size", "16"],
    },
    "lite0": {
        "model": ["--backbone", "tf_efficientnet_lite0", "--layers", "blocks.2", "blocks.4", "--image_size", "160"],
        "flow": ["--embed_dim", "152", "--lora_rank", "16"],
        "batch": ["--batch_size", "8"],
    },
    "smoke": {
        "model": ["--backbone", "resnet18", "--layers", "layer1", "layer2", "--image_size", "64"],
        "flow": ["--embed_dim", "32", "--lora_rank", "4"],
        "batch": ["--batch_size", "4"],
    },
}


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(title, argv)`` of every benchmark run for ``args``."""
    profile = PROFILES[args.profile]
    model = [*profile["model"], "--pre_trained", str(args.pre_trained)]
    accelerator = ["--accelerator", "gpu" if args.device == "cuda" else "cpu"]
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    smoke = args.profile == "smoke"
    size = profile["model"][-1]
    speed = ["speed_memory.py", *model, "--data_size", size, *profile["batch"], *accelerator, *threads]
    speed += profile["flow"]
    runs = [("Training and inference vs anomalib's Fastflow and Patchcore", speed)]
    if args.device == "cuda":
        runs.append(("The same with torch.compile", [*speed, "--compile_mode", "default"]))
    scaling = ["task_scaling.py", *model, *profile["flow"], *profile["batch"], *accelerator, *threads]
    scaling += ["--tasks", "2", "3"] if smoke else ["--epochs", str(args.epochs)]
    runs.append(("Cost against the number of tasks", scaling))
    deploy = ["deploy_speed.py", *model, *profile["flow"], "--device", args.device, *threads]
    deploy += ["--tasks", "1", "2", "--images", "4"] if smoke else []
    runs.append(("Deployed model (ONNX Runtime, OpenVINO) vs PyTorch", deploy))
    stream = ["stream_memory.py", *profile["model"], "--pre_trained", str(args.pre_trained), *threads]
    stream += ["--images", "200" if smoke else "2000"]
    runs.append(("Memory over a stream of images", stream))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="mvtec")
    parser.add_argument("--pre_trained", type=int, default=0, help="1: ImageNet weights (needs them offline or online)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task in the task-scaling runs")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each run")
    parser.add_argument("--output", default="results/benchmarks.md")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = [f"# Benchmarks: profile {args.profile}, {args.device}\n"]
    failed = 0
    for title, command in commands(args):
        print(f"== {title}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, str(HERE / command[0]), *command[1:]], check=False, capture_output=True, text=True
        )
        printed = completed.stdout.strip()
        body = printed if completed.returncode == 0 else f"failed:\n```\n{completed.stderr[-2000:]}\n```"
        failed += completed.returncode != 0
        seconds = time.perf_counter() - start
        section = f"## {title}\n\n`python scripts/benchmarks/{' '.join(command)}` ({seconds:.0f} s)\n\n"
        report.append(section + body + "\n")
        print(body, flush=True)
        output.write_text("\n".join(report))
    print(f"report: {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
