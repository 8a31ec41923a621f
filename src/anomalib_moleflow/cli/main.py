"""``moleflow`` command: ``continual`` (the study's protocol), ``benchmark``, ``generate-demo``.

Options come from the same typed signatures as the Python API (jsonargparse, like anomalib's CLI): every
``MoleFlow`` argument is ``--model.NAME``, and YAML configs use the same keys. The study's flags are accepted as
written (``--no_lora``, ``--no_dia``, ``--tail_weight 0``, ``--no_freeze_base``, ``--use_task_separated`` ...).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

#: The study's switches -> (model argument, value).
STUDY_SWITCHES: dict[str, tuple[str, str]] = {
    "--no_lora": ("use_lora", "false"),
    "--no_dia": ("dia_blocks", "0"),
    "--no_whitening_adapter": ("use_whitening_adapter", "false"),
    "--no_pos_embedding": ("use_pos_embedding", "false"),
    "--no_spatial_context": ("spatial_context_kernel", "0"),
    "--no_scale_context": ("scale_context_kernel", "0"),
    "--no_freeze_base": ("freeze_base", "false"),
    "--freeze_base": ("freeze_base", "true"),
    "--use_task_separated": ("task_separated", "true"),
}
_SKIPPED_MODEL_ARGS = {"pre_processor", "post_processor", "evaluator", "visualizer"}


def model_argument_names() -> list[str]:
    """Names of ``MoleFlow``'s own constructor arguments (the ones the study's ``--NAME VALUE`` flags address)."""
    from anomalib_moleflow.models import MoleFlow

    return [
        name for name in inspect.signature(MoleFlow.__init__).parameters if name not in {"self", *_SKIPPED_MODEL_ARGS}
    ]


def translate_study_flags(argv: Sequence[str], model_args: Sequence[str]) -> list[str]:
    """Rewrite the study's flags into ``--model.NAME VALUE`` form; everything else passes through."""
    out: list[str] = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name in STUDY_SWITCHES and not sep:
            key, switch_value = STUDY_SWITCHES[name]
            out += [f"--model.{key}", switch_value]
        elif name.startswith("--") and name[2:] in model_args:
            out.append(f"--model.{name[2:]}{sep}{value}")
        else:
            out.append(arg)
    return out


def import_class(path: str) -> type:
    """Import ``package.module.Class``."""
    module, _, name = path.rpartition(".")
    if not module:
        msg = f"Give a full class path such as 'anomalib.data.MVTecAD', got '{path}'."
        raise ValueError(msg)
    return getattr(importlib.import_module(module), name)


def build_tasks(spec: dict[str, Any]) -> list[tuple[str, Any]]:
    """Instantiate one datamodule per category; a list of categories (or ``name: [..]``) is one grouped task.

    ``spec`` = ``{"dataset": {"class_path": ..., "init_args": {...}}, "categories": [...]}``.
    """
    dataset = spec.get("dataset") or {}
    if "class_path" not in dataset:
        msg = "tasks.dataset.class_path is required (e.g. anomalib.data.MVTecAD)."
        raise ValueError(msg)
    cls = import_class(dataset["class_path"])
    init_args = dict(dataset.get("init_args") or {})
    categories = spec.get("categories") or []
    if not categories:
        msg = "tasks.categories is empty: list the categories to learn, one task each."
        raise ValueError(msg)
    tasks: list[tuple[str, Any]] = []
    for entry in categories:
        if isinstance(entry, str):
            tasks.append((entry, cls(category=entry, **init_args)))
        elif isinstance(entry, dict) and len(entry) == 1:
            name, members = next(iter(entry.items()))
            tasks.append((str(name), [cls(category=c, **init_args) for c in members]))
        else:
            members = list(entry)
            tasks.append(("+".join(members), [cls(category=c, **init_args) for c in members]))
    return tasks


def continual_parser() -> ArgumentParser:
    """Parser of ``moleflow continual``."""
    from anomalib_moleflow.models import MoleFlow

    parser = ArgumentParser(prog="moleflow continual", description="Learn a task sequence with MoLE-Flow and report.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--output", type=str, default="results/continual", help="Output folder.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--routing", type=Literal["router", "oracle"], default="router")
    parser.add_argument("--resume", type=bool, default=False, help="Continue after the last finished task.")
    parser.add_argument("--stop_after", type=int | None, default=None, help="Stop after this many tasks.")
    parser.add_argument("--from_checkpoint", type=str | None, default=None, help="Start from a saved model.")
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--devices", type=int | str, default=1)
    parser.add_argument("--progress_bar", type=bool, default=True)
    parser.add_argument("--overlays_per_task", type=int, default=4)
    parser.add_class_arguments(MoleFlow, "model", skip=_SKIPPED_MODEL_ARGS)
    parser.add_argument("--tasks", type=dict, help="{dataset: {class_path, init_args}, categories: [...]}")
    return parser


def run_continual(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``argv`` and run the continual engine; returns the results."""
    from lightning.pytorch import seed_everything

    from anomalib_moleflow.continual import ContinualEngine
    from anomalib_moleflow.models import MoleFlow

    parser = continual_parser()
    config: Namespace = parser.parse_args(translate_study_flags(argv, model_argument_names()))
    if config.tasks is None:
        parser.error("No tasks: pass --config with a `tasks:` section (see configs/continual/).")
    seed_everything(config.seed, verbose=False)
    model_kwargs = config.model.as_dict()
    if config.from_checkpoint:
        model = MoleFlow.load_from_checkpoint(config.from_checkpoint, visualizer=False)
    else:
        model = MoleFlow(**model_kwargs, visualizer=False)
    engine = ContinualEngine(
        output_dir=config.output,
        seed=config.seed,
        routing=config.routing,
        resume=config.resume,
        accelerator=config.accelerator,
        devices=config.devices,
        enable_progress_bar=config.progress_bar,
        overlays_per_task=config.overlays_per_task,
        config={"cli": parser.dump(config, skip_none=False, format="json")},
    )
    results = engine.run(model, build_tasks(config.tasks), stop_after=config.stop_after)
    print((Path(config.output) / "results.md").read_text())
    return results


def generate_demo(argv: Sequence[str]) -> None:
    """Generate the demo dataset (``moleflow generate-demo ROOT``)."""
    from anomalib_moleflow.data.synthetic import main as synthetic_main

    synthetic_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moleflow`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"continual", "benchmark", "generate-demo"}
    if not args or args[0] not in commands:
        print(f"usage: moleflow {{{','.join(sorted(commands))}}} [options]  (moleflow COMMAND --help)")
        return 0 if args and args[0] in {"-h", "--help"} else 2
    command, rest = args[0], args[1:]
    if command == "continual":
        run_continual(rest)
    elif command == "benchmark":
        from anomalib_moleflow.benchmark import run_benchmark_cli

        run_benchmark_cli(rest)
    else:
        generate_demo(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
