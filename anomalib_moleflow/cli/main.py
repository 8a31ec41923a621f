"""``moleflow``: ``continual`` (the study's protocol), ``benchmark``, ``generate-demo``, and ``anomalib`` (hand-off).

Options come from the same typed signatures as the Python API (jsonargparse, like anomalib's CLI): every
``MoleFlow`` argument is ``--model.NAME``, and YAML configs use the same keys. The study's flags are accepted as
written (``--no_lora``, ``--no_dia``, ``--tail_weight 0``, ``--no_freeze_base``, ``--use_task_separated`` ...).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import warnings
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
_COMPONENT_ARGS = {"pre_processor", "post_processor", "evaluator", "visualizer"}
_ANOMALIB_HELP = (
    "moleflow anomalib ARGS...: anomalib's own CLI with the plugin registered, e.g. `moleflow anomalib benchmark "
    "--config FILE` (its table accepts models reporting different metrics) or `moleflow anomalib train --model "
    "anomalib_moleflow.MoleFlow ...`."
)


def model_argument_names() -> list[str]:
    """Names of ``MoleFlow``'s own constructor arguments (the ones the study's ``--NAME VALUE`` flags address)."""
    from anomalib_moleflow.models import MoleFlow

    parameters = inspect.signature(MoleFlow.__init__).parameters
    return [name for name in parameters if name not in {"self", *_COMPONENT_ARGS}]


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


def continual_parser() -> ArgumentParser:
    """Parser of ``moleflow continual``."""
    from anomalib_moleflow.engine.options import add_run_options
    from anomalib_moleflow.models import MoleFlow

    parser = ArgumentParser(description="Learn a task sequence with MoLE-Flow and report the study's metrics.")
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
        "must match it; training options (lr, max_epochs, loss weights) apply to the new tasks.",
    )
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: automatic).")
    parser.add_argument("--progress_bar", type=bool, nargs="?", const=True, default=True)
    parser.add_argument("--overlays_per_task", type=int, default=4)
    parser.add_class_arguments(MoleFlow, "model", skip=_COMPONENT_ARGS)
    parser.add_argument("--tasks", type=dict | list | None, default=None, help="{dataset: {...}, categories: [...]}")
    return parser


def generate_demo_parser() -> ArgumentParser:
    """Parser of ``moleflow generate-demo``."""
    from anomalib_moleflow.data.synthetic import generate_demo

    parser = ArgumentParser(description="Generate the offline demo dataset (MVTec AD layout, images and masks).")
    parser.add_function_arguments(generate_demo, as_positional=True)
    return parser


def ablate_parser() -> ArgumentParser:
    """Parser of ``moleflow ablate``."""
    parser = ArgumentParser(description="Run an ablation or sweep suite (MAIN plus one override per run) into tables.")
    parser.add_argument("--suite", type=str | None, default=None, help="A suite of configs/ablations/ (e.g. core).")
    parser.add_argument("--config", type=str | None, default=None, help="A suite YAML instead of --suite.")
    parser.add_argument(
        "--base",
        type=str | None,
        default=None,
        help="A continual config that replaces the suite's base (other data), e.g. configs/continual/elpv.yaml.",
    )
    parser.add_argument("--output", type=str, default="results/ablations", help="Suites go to OUTPUT/SUITE/.")
    parser.add_argument(
        "--scale",
        type=Literal["full", "smoke"],
        default="full",
        help="full: the suite's configs (GPU); smoke: two generated tasks, tiny random backbone, one epoch (CPU).",
    )
    parser.add_argument("--summary", type=str | None, default=None, help="Merge the suites finished in this folder.")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: automatic).")
    return parser


def run_ablate(config: Namespace) -> Path:
    """Run ``moleflow ablate``; returns the table it wrote (the suite's, or the summary)."""
    from anomalib_moleflow.ablation import load_suite, run_suite
    from anomalib_moleflow.ablation.suite import suite_path
    from anomalib_moleflow.reports.ablation_table import write_summary

    if config.summary:
        return write_summary(config.summary)
    if not (config.suite or config.config):
        msg = "Pass --suite NAME (a file of configs/ablations/), --config FILE, or --summary FOLDER."
        raise ValueError(msg)
    suite = load_suite(config.config or suite_path(config.suite), config.base)
    run_suite(suite, config.output, config.scale)
    return Path(config.output) / suite.name / "suite.md"


def predict_parser() -> ArgumentParser:
    """Parser of ``moleflow predict``."""
    from anomalib_moleflow.models.moleflow.lightning_model import CompileMode

    parser = ArgumentParser(description="Score images of any of the learned products with a saved model.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--ckpt", type=str, required=True, help="A model.ckpt written by `moleflow continual`.")
    parser.add_argument("--input", type=str, required=True, help="An image, or a folder (nested, mixed products).")
    parser.add_argument("--output", type=str, default="results/predict", help="Output folder.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--overlays", type=bool, default=True, help="Save an anomaly-map overlay per image.")
    parser.add_argument("--progress_bar", type=bool, default=True)
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: automatic).")
    parser.add_argument(
        "--compile_mode",
        type=CompileMode,
        default="off",
        help="torch.compile the model first (e.g. default on a GPU); the checkpoint's own setting is not used.",
    )
    return parser


def run_predict(config: Namespace) -> Path:
    """Run ``moleflow predict``; returns the CSV's path."""
    from anomalib_moleflow.engine.predict import predict_folder
    from anomalib_moleflow.models import MoleFlow

    model = MoleFlow.continue_from(config.ckpt, visualizer=False, compile_mode=config.compile_mode)
    return predict_folder(model, config.input, config.output, config.batch_size, config.overlays, config.progress_bar)


def export_parser() -> ArgumentParser:
    """Parser of ``moleflow export``."""
    from anomalib_moleflow.engine.export import ExportFormat
    from anomalib_moleflow.engine.options import add_overwrite_option

    parser = ArgumentParser(description="Export a saved model with every task into one artefact, and its loader.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--ckpt", type=str, required=True, help="A model.ckpt written by `moleflow continual`.")
    parser.add_argument("--output", type=str, default="results/export", help="Output folder.")
    parser.add_argument("--format", type=ExportFormat, default="onnx", help="onnx, openvino or torch.")
    add_overwrite_option(parser, "Replace an earlier export in --output (without it, such a folder is refused).")
    return parser


def run_export(config: Namespace) -> Path:
    """Run ``moleflow export``; returns the model file."""
    from anomalib_moleflow.engine.export import export_model
    from anomalib_moleflow.models import MoleFlow

    model = MoleFlow.continue_from(config.ckpt, visualizer=False, compile_mode="off")
    return export_model(model, config.output, config.format, config.overwrite)


def convert_parser() -> ArgumentParser:
    """Parser of ``moleflow convert-8bit``."""
    from anomalib_moleflow.data.convert import convert_8bit

    parser = ArgumentParser(description="Copy a dataset folder with its 16-bit images converted to 8 bits.")
    parser.add_function_arguments(convert_8bit, as_positional=True)
    return parser


def build_parser() -> ArgumentParser:
    """The ``moleflow`` parser with its subcommands."""
    from anomalib_moleflow.benchmark import benchmark_parser

    parser = ArgumentParser(
        prog="moleflow",
        description="MoLE-Flow: continual anomaly detection as an anomalib plugin.",
        epilog=_ANOMALIB_HELP,
    )
    subcommands = parser.add_subcommands(dest="command")
    subcommands.add_subcommand("continual", continual_parser(), help="Learn a task sequence and report.")
    subcommands.add_subcommand(
        "benchmark", benchmark_parser(), help="MoLE-Flow vs anomalib's Fastflow, Patchcore and Padim on the same tasks."
    )
    subcommands.add_subcommand("generate-demo", generate_demo_parser(), help="Generate the offline demo dataset.")
    subcommands.add_subcommand("predict", predict_parser(), help="Score images with a saved model, into a CSV.")
    subcommands.add_subcommand(
        "export", export_parser(), help="Export a saved model (router and every expert) to ONNX, OpenVINO or torch."
    )
    subcommands.add_subcommand("ablate", ablate_parser(), help="Run an ablation or sweep suite; merge suites.")
    subcommands.add_subcommand(
        "convert-8bit", convert_parser(), help="Copy a dataset folder with its 16-bit images converted to 8 bits."
    )
    return parser


def run_continual(config: Namespace) -> dict[str, Any]:
    """Run ``moleflow continual`` from its parsed options; returns the results."""
    from lightning.pytorch import seed_everything

    from anomalib_moleflow.data import build_tasks
    from anomalib_moleflow.engine import ContinualEngine, MoleFlowStrategy
    from anomalib_moleflow.models import MoleFlow

    if config.tasks is None:
        msg = "No tasks: pass --config with a `tasks:` section (see configs/continual/)."
        raise ValueError(msg)
    seed_everything(config.seed, verbose=False)
    if (
        config.from_checkpoint
        and config.overwrite
        and Path(config.output).resolve() in (Path(config.from_checkpoint).resolve().parents)
    ):
        msg = (
            f"--overwrite would delete '{config.from_checkpoint}', the checkpoint this run starts from. Write the "
            "run into another --output, or copy the checkpoint out of the folder first."
        )
        raise ValueError(msg)
    if config.from_checkpoint:
        # Options left at their defaults take the checkpoint's values; the ones given are checked or applied.
        defaults = _as_data(continual_parser().get_defaults().model.as_dict())
        given = {name: value for name, value in config.model.as_dict().items() if _as_data(value) != defaults[name]}
        model = MoleFlow.continue_from(config.from_checkpoint, **given, visualizer=False)
    else:
        model = MoleFlow(**config.model.as_dict(), visualizer=False)
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
        config={"cli": config.as_dict()},
    )
    return engine.run(MoleFlowStrategy(model, config.routing), build_tasks(config.tasks), stop_after=config.stop_after)


def _as_data(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists), to compare options with their defaults."""
    return json.loads(json.dumps(value, default=str))


def run_anomalib(argv: Sequence[str]) -> None:
    """anomalib's CLI in this process, with the plugin registered and :mod:`anomalib_moleflow.benchmark`'s pipeline.

    ``anomalib benchmark`` only loads models from anomalib's own namespaces, and its results table fails when the
    models report different metrics; here both work. anomalib itself is left as shipped for every other program.
    """
    from anomalib.cli import cli as anomalib_cli
    from anomalib.cli.pipelines import PIPELINE_REGISTRY

    import anomalib_moleflow  # noqa: F401  (registers the plugin with anomalib)
    from anomalib_moleflow.benchmark.anomalib_pipeline import Benchmark

    if PIPELINE_REGISTRY is not None:
        PIPELINE_REGISTRY["benchmark"] = Benchmark
    anomalib_cli.AnomalibCLI(args=list(argv))


def _quiet_third_party() -> None:
    """Keep the libraries' import-time deprecation notices and CUDA probing out of our commands' output."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Lightning announces devices, product tips and checkpoint defaults at INFO for every fit and test (dozens per
    # continual run); the backbone is frozen in eval mode on purpose.
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning_fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moleflow`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("anomalib_moleflow").setLevel(logging.INFO)
    if args[:1] == ["anomalib"]:
        run_anomalib(args[1:])
        return 0
    if args[:1] == ["continual"]:
        args = ["continual", *translate_study_flags(args[1:], model_argument_names())]
    from anomalib_moleflow.data import DatasetError

    parser = build_parser()
    config = parser.parse_args(args)
    command = config.command
    options = config[command]
    try:
        if command == "continual":
            from anomalib_moleflow.runtime import torch_threads

            with torch_threads(options.threads):
                run_continual(options)
            sys.stdout.write((Path(options.output) / "results.md").read_text())
        elif command == "benchmark":
            from anomalib_moleflow.benchmark import run_benchmark

            run_benchmark(options)
            table = "seeds.md" if options.seeds else "benchmark.md"
            sys.stdout.write((Path(options.output) / table).read_text())
        elif command == "ablate":
            from anomalib_moleflow.runtime import torch_threads

            with torch_threads(options.threads):
                table = run_ablate(options)
            sys.stdout.write(table.read_text())
        elif command == "predict":
            from anomalib_moleflow.runtime import torch_threads

            with torch_threads(options.threads):
                csv_path = run_predict(options)
            sys.stdout.write(f"{csv_path}\n")
        elif command == "export":
            sys.stdout.write(f"{run_export(options)}\n")
        elif command == "convert-8bit":
            from anomalib_moleflow.data.convert import convert_8bit

            converted = convert_8bit(**options.as_dict())
            sys.stdout.write(f"{converted} image(s) converted into {options.target}\n")
        else:
            from anomalib_moleflow.data.synthetic import generate_demo

            folders = generate_demo(**options.as_dict())
            sys.stdout.write("".join(f"{folder}\n" for folder in folders))
    except (ValueError, FileExistsError, FileNotFoundError, DatasetError) as error:  # CheckpointError included
        parser.exit(1, f"moleflow {command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
