"""``moleflow predict`` and ``moleflow export``: their options, and how each command runs (:mod:`.predict`,
:mod:`.export`).

Options load without torch or anomalib; each command imports its engine only once its options are valid.
"""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from anomalib_moleflow.checkpoint import check_checkpoint_path
from anomalib_moleflow.deploy.inferencer import scoreable_files
from anomalib_moleflow.models.moleflow.settings import CompileMode
from anomalib_moleflow.parser import OptionParser

from .options import PREDICT_OUTPUTS, ExportFormat, add_overwrite_option, check_export_format


def predict_parser() -> ArgumentParser:
    """Options of ``moleflow predict``."""
    parser = OptionParser(
        prog="moleflow predict", description="Score images of any of the learned products with a saved model."
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--ckpt", type=str, required=True, help="A model.ckpt written by `moleflow continual`.")
    parser.add_argument(
        "--input",
        type=str,
        required=True,
        help="An image, or a folder (nested, mixed products). Files under anomalib's mask folders (ground_truth) "
        "are skipped.",
    )
    parser.add_argument("--output", type=str, default="results/predict", help="Output folder.")
    add_overwrite_option(parser, "Replace an earlier prediction in --output (without it, such a folder is refused).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--overlays", type=bool, default=True, help="Save an overlay per image, named after its path below --input."
    )
    parser.add_argument("--progress_bar", type=bool, default=True)
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: automatic).")
    parser.add_argument(
        "--compile_mode",
        type=CompileMode,
        default="off",
        help="torch.compile the model first (e.g. default on a GPU); the checkpoint's own setting is not used.",
    )
    return parser


def predict_command(argv: Sequence[str]) -> str:
    """``moleflow predict ARGS``; returns the summary line (the CSV names every image that could not be scored)."""
    from anomalib_moleflow.io import claim_output_dir

    config = predict_parser().parse_args(list(argv))
    check_checkpoint_path(config.ckpt)
    scoreable_files(config.input)  # the input exists and holds images
    if not config.overwrite:  # refuse at once, before the model loads
        claim_output_dir(config.output, PREDICT_OUTPUTS, resume=False, overwrite=False, resumable=False)

    from anomalib_moleflow.models import MoleFlow
    from anomalib_moleflow.runtime import torch_threads

    from .predict import predict_folder
    from .trainer import TaskTrainer

    with torch_threads(config.threads):
        model = MoleFlow.continue_from(config.ckpt, visualizer=False, compile_mode=config.compile_mode)
        summary = predict_folder(
            model,
            config.input,
            config.output,
            config.batch_size,
            config.overlays,
            config.progress_bar,
            overwrite=config.overwrite,
            trainer=TaskTrainer(accelerator=config.accelerator, progress_bar=config.progress_bar),
        )
    return f"{summary.line()}\n"


def export_parser() -> ArgumentParser:
    """Options of ``moleflow export``."""
    parser = OptionParser(
        prog="moleflow export", description="Export a saved model with every task into one artefact, and its loader."
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--ckpt", type=str, required=True, help="A model.ckpt written by `moleflow continual`.")
    parser.add_argument("--output", type=str, default="results/export", help="Output folder.")
    parser.add_argument("--format", type=ExportFormat, default="onnx", help="onnx, openvino or torch.")
    add_overwrite_option(parser, "Replace an earlier export in --output (without it, such a folder is refused).")
    return parser


def export_command(argv: Sequence[str]) -> str:
    """``moleflow export ARGS``; returns the model file's path."""
    config = export_parser().parse_args(list(argv))
    check_checkpoint_path(config.ckpt)
    check_export_format(config.format)  # before the model loads; export_model checks the folder
    from anomalib_moleflow.models import MoleFlow

    from .export import export_model

    model = MoleFlow.continue_from(config.ckpt, visualizer=False, compile_mode="off")
    return f"{export_model(model, config.output, config.format, config.overwrite)}\n"
