"""``moleflow``: a thin shell over the commands, each defined beside the engine it runs.

Each command's options come from the same typed signatures as the Python API (jsonargparse, like anomalib's CLI) and
live in a module that loads without torch or anomalib, so ``--help``, option errors and refusals (an output folder
already used) answer at once; the engine loads only once the options are valid. A user's mistake (a missing dataset,
a damaged checkpoint, a diverged training) is one line on stderr, exit code 1; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

#: Command -> (module, its options' parser, the function that runs it and returns the text to print, one-line help).
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "continual": (
        "anomalib_moleflow.engine.runner",
        "continual_parser",
        "command",
        "Learn a task sequence and report.",
    ),
    "benchmark": (
        "anomalib_moleflow.benchmark.command",
        "benchmark_parser",
        "benchmark_command",
        "MoLE-Flow vs anomalib's Fastflow, Patchcore and Padim on the same tasks.",
    ),
    "predict": (
        "anomalib_moleflow.engine.commands",
        "predict_parser",
        "predict_command",
        "Score images with a saved model, into a CSV.",
    ),
    "export": (
        "anomalib_moleflow.engine.commands",
        "export_parser",
        "export_command",
        "Export a saved model (router and every expert) to ONNX, OpenVINO or torch.",
    ),
    "ablate": (
        "anomalib_moleflow.ablation.options",
        "ablate_parser",
        "ablate_command",
        "Run an ablation or sweep suite; merge suites.",
    ),
    "generate-demo": (
        "anomalib_moleflow.data.commands",
        "generate_demo_parser",
        "generate_demo_command",
        "Generate the offline demo dataset.",
    ),
    "convert-8bit": (
        "anomalib_moleflow.data.commands",
        "convert_parser",
        "convert_command",
        "Copy a dataset folder with its 16-bit images converted to 8 bits.",
    ),
}
_ANOMALIB_HELP = (
    "moleflow anomalib ARGS...: anomalib's own CLI with the plugin registered, e.g. `moleflow anomalib benchmark "
    "--config FILE` (its table accepts models reporting different metrics) or `moleflow anomalib train --model "
    "anomalib_moleflow.MoleFlow ...`."
)


def usage() -> str:
    """The top-level help: every command and its one-line description."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: moleflow [--verbose] COMMAND [OPTIONS]   (moleflow COMMAND --help: the command's options)",
        "",
        "MoLE-Flow: continual anomaly detection as an anomalib plugin.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (*_, text) in COMMANDS.items()),
        f"  {'anomalib':<{width}}  anomalib's own CLI with the plugin registered.",
        "",
        "options:",
        "  --verbose  Show the traceback of an error (and the libraries' log lines).",
        "",
        _ANOMALIB_HELP,
    ]
    return "\n".join(lines) + "\n"


def command_function(name: str) -> Callable[[Sequence[str]], str]:
    """The function that runs command ``name`` (its module imported now)."""
    module, _, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def command_parser(name: str) -> ArgumentParser:
    """The options' parser of command ``name`` (what ``moleflow NAME --help`` shows)."""
    module, parser, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), parser)()


def parse(argv: Sequence[str]) -> tuple[str, Namespace]:
    """``moleflow`` arguments as the command and its parsed options (the study's flags translated), without running.

    Raises:
        SystemExit: On an unknown command or invalid options, as the command line does.
    """
    name, rest = argv[0], list(argv[1:])
    if name not in COMMANDS:
        sys.stderr.write(f"moleflow: error: unknown command '{name}'; choose one of {', '.join(COMMANDS)}.\n")
        raise SystemExit(2)
    if name == "continual":
        from anomalib_moleflow.engine.runner import translate_study_flags

        rest = translate_study_flags(rest)
    return name, command_parser(name).parse_args(rest)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (its message says how), not a bug of ours or of a library."""
    from anomalib_moleflow.errors import UserError

    ours = type(error).__module__.startswith("anomalib_moleflow")  # our own error classes carry advice
    builtin = isinstance(error, ValueError | FileExistsError | FileNotFoundError | FloatingPointError)
    return isinstance(error, UserError) or ours or builtin or isinstance(error, ModuleNotFoundError)


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


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("anomalib_moleflow").setLevel(logging.INFO)
    if verbose:
        return
    from anomalib_moleflow.runtime import quiet_libraries

    quiet_libraries()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moleflow`` command; returns the exit code (``sys.exit`` for help and option errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    args = [arg for arg in args if arg != "--verbose"]
    if not args or args[0] in {"-h", "--help"}:
        sys.stdout.write(usage())
        raise SystemExit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name == "anomalib":
        _logging(verbose)
        run_anomalib(rest)
        return 0
    if name not in COMMANDS:
        sys.stderr.write(f"moleflow: error: unknown command '{name}'; choose one of {', '.join(COMMANDS)}.\n")
        sys.stderr.write(usage())
        raise SystemExit(2)
    _logging(verbose)
    try:
        output = command_function(name)(rest)
    except Exception as error:
        if verbose:
            traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        if is_user_error(error):
            sys.stderr.write(f"moleflow {name}: error: {message}\n")
        else:
            hint = "" if verbose else " (run with --verbose for the traceback)"
            sys.stderr.write(f"moleflow {name}: internal error: {type(error).__name__}: {message}{hint}\n")
        raise SystemExit(1) from None
    sys.stdout.write(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
