"""What the commands that write a run folder (``continual``, ``benchmark``, ``export``) share: options, file names.

No torch or anomalib import here: the command line reads it to answer ``--help`` and to refuse a folder at once.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from typing import Any, Literal, get_args

import yaml
from jsonargparse import ArgumentParser

from anomalib_moleflow.checkpoint import checksum_path

#: The run's state (finished tasks, matrix, config), written after each task.
STATE_FILE = "state.json"
#: The model learned so far, written after each task (with its checksum beside it).
CHECKPOINT_FILE = "model.ckpt"
#: What a continual run writes into its output folder (``overwrite`` deletes these and nothing else).
RUN_OUTPUTS: tuple[str, ...] = (
    STATE_FILE,
    CHECKPOINT_FILE,
    checksum_path(CHECKPOINT_FILE).name,
    "results.json",
    "results.csv",
    "results.md",
    "heatmap_*.png",
    "final_per_task.png",
    "tasks",
    "overlays",
)

ExportFormat = Literal["onnx", "openvino", "torch"]
#: The CSV ``moleflow predict`` writes.
CSV_FILE = "predictions.csv"
#: What a prediction writes into its output folder (``overwrite`` deletes these and nothing else).
PREDICT_OUTPUTS: tuple[str, ...] = (CSV_FILE, "overlays")
#: The packages each format needs, and the extra that installs them.
FORMAT_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "onnx": (("onnx", "onnxscript"), "export"),
    "openvino": (("onnx", "onnxscript", "openvino"), "openvino"),
    "torch": ((), ""),
}


def check_export_format(export_format: str) -> None:
    """Refuse an unknown format, or one whose packages are not installed, naming the extra that installs them.

    Raises:
        ValueError: For an unknown format.
        ModuleNotFoundError: For a missing package.
    """
    if export_format not in get_args(ExportFormat):
        msg = f"Unknown export format '{export_format}': choose one of {', '.join(get_args(ExportFormat))}."
        raise ValueError(msg)
    packages, extra = FORMAT_PACKAGES[export_format]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        msg = (
            f"`moleflow export --format {export_format}` needs {', '.join(missing)}, which is not installed: "
            f"pip install 'anomalib-moleflow[{extra}]' (from a clone: pip install '.[{extra}]')."
        )
        raise ModuleNotFoundError(msg)


def add_run_options(parser: ArgumentParser, resume_help: str) -> None:
    """Add ``--resume``, ``--overwrite``, ``--accelerator``, ``--devices``, ``--strategy`` and ``--precision``."""
    parser.add_argument("--resume", type=bool, nargs="?", const=True, default=False, help=resume_help)
    add_overwrite_option(
        parser, "Delete the earlier run's outputs in --output first (without it or --resume, such a folder is refused)."
    )
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--devices", type=int | str, default=1)
    parser.add_argument(
        "--strategy",
        type=str,
        default="auto",
        help="Lightning strategy; with several --devices: ddp (one process per device; rank 0 writes the outputs).",
    )
    parser.add_argument(
        "--precision",
        type=str | None,
        default=None,
        help="Lightning precision of every fit and test, e.g. bf16-mixed or 16-mixed on a GPU (default: float32).",
    )


def check_devices(devices: int | str, strategy: str = "auto", threshold: str = "f1", baseline: bool = False) -> None:
    """Refuse several devices per run unless the run can combine its ranks (MoLE-Flow under ``--strategy ddp``).

    Raises:
        ValueError: Naming what to change.
    """
    text = str(devices).strip()
    listed = [part for part in text.strip("[]").split(",") if part.strip()]
    # Lightning's forms: a count ("1"), or device indices ("[0]", "0,"); "auto" and -1 take every device there is.
    if text == "1" or (("," in text or text.startswith("[")) and len(listed) == 1):
        return
    reason = ""
    if strategy != "ddp":
        reason = (
            f"several devices need --strategy ddp (got {strategy!r}): it starts one process per device, each running "
            "the whole sequence on its shard of the images, and MoLE-Flow combines what they collect"
        )
    elif baseline:
        reason = "DDP runs MoLE-Flow only; anomalib's baselines here keep per-process memory banks and statistics"
    elif threshold == "good_fpr":
        reason = "threshold 'good_fpr' holds out images per batch, which DDP's ranks would do differently"
    if reason:
        msg = (
            f"--devices {devices}: {reason}. Use --devices 1 for this run, or spread a suite's runs over GPUs and "
            "machines with `--executor ray`."
        )
        raise ValueError(msg)


def add_overwrite_option(parser: ArgumentParser, help_text: str) -> None:
    """Add ``--overwrite`` (a bare flag, or ``--overwrite true|false``) to ``parser``."""
    parser.add_argument("--overwrite", type=bool, nargs="?", const=True, default=False, help=help_text)


def split_dotted(argv: Sequence[str], key: str) -> tuple[list[str], list[tuple[list[str], Any]]]:
    """Take ``--KEY.PATH VALUE`` (or ``--KEY.PATH=VALUE``) out of ``argv``: a change to one leaf of the ``KEY`` tree.

    jsonargparse would replace the whole ``KEY`` value with the leaf (``--tasks.dataset.init_args.root X`` would drop
    the config's class path and categories); :func:`apply_dotted` changes just that leaf of the config's tree.

    Returns:
        The other arguments, and each ``(path, value)`` (the value read as YAML: numbers, booleans, lists).
    """
    prefix = f"--{key}."
    rest: list[str] = []
    changes: list[tuple[list[str], Any]] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith(prefix):
            name, sep, value = arg[len(prefix) :].partition("=")
            if not sep:
                if index + 1 >= len(args):
                    msg = f"{arg} needs a value."
                    raise ValueError(msg)
                index += 1
                value = args[index]
            changes.append((name.split("."), yaml.safe_load(value)))
        else:
            rest.append(arg)
        index += 1
    return rest, changes


def apply_dotted(tree: Any, changes: Sequence[tuple[list[str], Any]], key: str) -> Any:
    """``tree`` (a config's ``KEY`` value: dictionaries and lists) with each change of :func:`split_dotted` applied.

    A list is indexed by number (``--tasks.0.dataset.init_args.root``).

    Raises:
        ValueError: If a path does not lead into the tree (naming what exists there).
    """
    tree = copy.deepcopy(tree)
    for path, value in changes:
        if tree is None:
            msg = f"--{key}.{'.'.join(path)}: there is no `{key}:` section to change; give it with --config first."
            raise ValueError(msg)
        node = tree
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            where = ".".join([key, *path[:depth]])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    option = f"--{key}.{'.'.join(path)}"
                    msg = f"{option}: `{where}` is a list of {len(node)}; index it with 0..{len(node) - 1}."
                    raise ValueError(msg)
                part = int(part)
            elif not isinstance(node, dict):
                msg = f"--{key}.{'.'.join(path)}: `{where}` is a value, not a section."
                raise ValueError(msg)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return tree
