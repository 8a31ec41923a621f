"""The one continual runner: its options and :func:`run_continual`.

``moleflow continual``, every run of an ablation suite (:mod:`anomalib_moleflow.ablation`) and every row and seed of
``moleflow benchmark`` resolve their config with :func:`continual_parser` (one set of keys, one set of defaults, unknown
keys refused) and run through :func:`run_continual`: tasks built and checked, the output folder claimed, the model (or
the row's strategy) built, the :class:`~anomalib_moleflow.engine.continual.ContinualEngine` run, the table written.

This module imports neither torch nor anomalib at load time: the command line builds its options in milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from anomalib_moleflow.distributed import is_rank_zero
from anomalib_moleflow.io import claim_output_dir
from anomalib_moleflow.models.moleflow.settings import MoleFlowSettings, names, stage_whitening_norms
from anomalib_moleflow.parser import OptionParser, one_line

from .options import RUN_OUTPUTS, add_run_options, apply_dotted, check_devices, split_dotted

if TYPE_CHECKING:
    from anomalib_moleflow.data import Task

    from .strategies import Strategy

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


def model_argument_names() -> list[str]:
    """Names of ``MoleFlow``'s settings (the ones the study's ``--NAME VALUE`` flags address)."""
    return names(MoleFlowSettings)


def translate_study_flags(argv: Sequence[str], model_args: Sequence[str] | None = None) -> list[str]:
    """Rewrite the study's flags into ``--model.NAME VALUE`` form; everything else passes through."""
    model_args = model_argument_names() if model_args is None else model_args
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


def continual_parser(exit_on_error: bool = True) -> ArgumentParser:
    """Options of a continual run (``moleflow continual``; a suite run's or a config file's keys are the same).

    Args:
        exit_on_error: ``False`` to raise instead of exiting on a bad option (configs resolved by code).
    """
    parser = OptionParser(
        prog="moleflow continual",
        description="Learn a task sequence with MoLE-Flow and report the study's metrics.",
        exit_on_error=exit_on_error,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--output", type=str, default="results/continual", help="Output folder.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--routing",
        type=Literal["router", "oracle"],
        default="router",
        help="router: the model picks each test image's task; oracle: the true task (ablations).",
    )
    add_run_options(parser, "Continue after the last finished task.")
    parser.add_argument("--stop_after", type=int | None, default=None, help="Stop after this many tasks.")
    parser.add_argument(
        "--from_checkpoint",
        type=str | None,
        default=None,
        help="Start from a saved model and learn the tasks it lacks. --model.* options that define the architecture "
        "must match it; the others given (lr, max_epochs, loss weights...) apply to the new tasks.",
    )
    parser.add_argument(
        "--threads",
        type=int | None,
        default=None,
        help="torch CPU threads (default: the usable cores not busy with other work). Results move slightly with "
        "the thread count (float sums in another order); set it to reproduce a run to the digit.",
    )
    parser.add_argument("--progress_bar", type=bool, nargs="?", const=True, default=True)
    parser.add_argument("--overlays_per_task", type=int, default=4, help="Anomaly-map overlays saved per task.")
    parser.add_class_arguments(MoleFlowSettings, "model")
    parser.add_argument(
        "--tasks",
        type=dict | list | None,
        default=None,
        help="{dataset: {class_path, init_args}, categories: [...]}, or a list of them (tasks in order).",
    )
    return parser


def resolve(config: Mapping[str, Any] | Namespace) -> Namespace:
    """A continual config as its parsed, validated and completed namespace (the keys of :func:`continual_parser`).

    Raises:
        ValueError: Naming the first unknown key or invalid value (also a whitening_norm's names or count).
    """
    if isinstance(config, Namespace):
        return config
    parser = continual_parser(exit_on_error=False)
    try:
        namespace = parser.parse_object(dict(config))
    except Exception as error:  # jsonargparse's ArgumentError, as one line: the key and what is wrong
        msg = f"Invalid continual config: {one_line(str(error))}"
        raise ValueError(msg) from error
    model = namespace.model  # the names and the count of whitening_norm, typed str for the parser
    stage_whitening_norms(model.whitening_norm, list(model.layers), model.flow_layout)
    return namespace


def _config_files(argv: Sequence[str]) -> list[Path]:
    files = []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            files.append(Path(argv[index + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.partition("=")[2]))
    return files


def given_model_settings(argv: Sequence[str]) -> set[str]:
    """The ``--model.*`` settings a user wrote: on the command line (after :func:`translate_study_flags`) or in a
    ``--config`` file's ``model:`` section, whatever their value (a value equal to the default counts as given)."""
    given = set()
    for arg in argv:
        if arg.startswith("--model."):
            given.add(arg[len("--model.") :].partition("=")[0])
    for path in _config_files(argv):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the parser reports unreadable configs itself
        given |= set((data.get("model") or {}) if isinstance(data, dict) else {})
    return given & set(model_argument_names())


def check_output(config: Namespace) -> None:
    """Refuse an output folder that holds an earlier run (without ``resume`` or ``overwrite``) before anything loads.

    Raises:
        FileExistsError: If it does.
        ValueError: If ``--overwrite`` would delete the checkpoint the run starts from.
    """
    if (
        config.from_checkpoint
        and config.overwrite
        and Path(config.output).resolve() in Path(config.from_checkpoint).resolve().parents
    ):
        msg = (
            f"--overwrite would delete '{config.from_checkpoint}', the checkpoint this run starts from. Write the "
            "run into another --output, or copy the checkpoint out of the folder first."
        )
        raise ValueError(msg)
    if not (config.resume or config.overwrite):
        claim_output_dir(config.output, RUN_OUTPUTS, resume=False, overwrite=False)


def run_continual(
    config: Mapping[str, Any] | Namespace,
    given: set[str] | None = None,
    strategy: Strategy | None = None,
    tasks: list[Task] | None = None,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one continual config: the tasks, the model (or ``strategy``), the engine, the results table.

    Args:
        config: A :func:`continual_parser` namespace, or a dictionary of its keys (resolved by :func:`resolve`).
        given: The ``model`` settings the user chose (with ``from_checkpoint``, only these override the
            checkpoint's); ``None``: every key of a dictionary config's ``model`` section, or none of a namespace's.
        strategy: The method to run instead of MoLE-Flow from ``config.model`` (a benchmark row's baseline).
        tasks: The tasks, already built (a benchmark builds them once for all its rows); default: ``config.tasks``.
        record: More settings to store in ``results.json`` and to check on resume (e.g. the benchmark row).

    Returns:
        The results (also ``OUTPUT/results.json``, ``.csv``, ``.md`` and plots).

    Raises:
        ValueError: On a bad config (no tasks, unknown keys, settings a checkpoint cannot take).
        FileExistsError: If the output folder holds an earlier run and neither ``resume`` nor ``overwrite`` is set.
        anomalib_moleflow.data.DatasetError: If a dataset is missing (before any model is built).
    """
    if given is None:
        given = set((config.get("model") or {}) if isinstance(config, Mapping) else ())
    config = resolve(config)
    if config.tasks is None and tasks is None:
        msg = "No tasks: pass --config with a `tasks:` section (see configs/continual/)."
        raise ValueError(msg)
    check_devices(config.devices, config.strategy, config.model.threshold, baseline=strategy is not None)
    if is_rank_zero():  # under DDP the other ranks start later, inside rank 0's first fit, in its claimed folder
        check_output(config)  # before anything heavy loads

    from lightning.pytorch import seed_everything

    from anomalib_moleflow.data import build_tasks, check_datamodule
    from anomalib_moleflow.runtime import torch_threads

    from .continual import ContinualEngine

    if tasks is None:
        tasks = build_tasks(config.tasks)
    for task in tasks:
        for member in task.members:
            check_datamodule(member)  # before the backbone loads
    with torch_threads(config.threads):
        seed_everything(config.seed, verbose=False)
        if strategy is None:
            strategy = moleflow_strategy(config, given)
        engine = ContinualEngine(
            output_dir=config.output,
            seed=config.seed,
            resume=config.resume,
            overwrite=config.overwrite,
            accelerator=config.accelerator,
            devices=config.devices,
            enable_progress_bar=config.progress_bar,
            overlays_per_task=config.overlays_per_task,
            precision=config.precision,
            lightning_strategy=config.strategy,
            config={"cli": json.loads(json.dumps(config.as_dict(), default=str)), **dict(record or {})},
        )
        return engine.run(strategy, tasks, stop_after=config.stop_after)


def moleflow_strategy(config: Mapping[str, Any] | Namespace, given: set[str] | None = None) -> Strategy:
    """MoLE-Flow from a continual config's ``model`` settings (or its ``from_checkpoint``), with its routing.

    Args:
        config: A continual config (see :func:`run_continual`).
        given: With ``from_checkpoint``, the settings that replace the checkpoint's (the others are its own).
    """
    from anomalib_moleflow.models import MoleFlow

    from .strategies import MoleFlowStrategy

    config = resolve(config)
    settings = config.model.as_dict()
    if config.from_checkpoint:
        chosen = {name: value for name, value in settings.items() if name in (given or set())}
        model = MoleFlow.continue_from(config.from_checkpoint, **chosen, visualizer=False)
    else:
        model = MoleFlow(**settings, visualizer=False)
    return MoleFlowStrategy(model, config.routing)


def command(argv: Sequence[str]) -> str:
    """``moleflow continual ARGS``: run and return the results table to print."""
    argv = translate_study_flags(argv)
    rest, changes = split_dotted(argv, "tasks")
    config = continual_parser().parse_args(rest)
    if changes:
        config.tasks = apply_dotted(config.tasks, changes, "tasks")
    run_continual(config, given=given_model_settings(rest))
    return (Path(config.output) / "results.md").read_text() if is_rank_zero() else ""
