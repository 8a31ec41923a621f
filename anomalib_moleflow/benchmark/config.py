"""Benchmark configuration: the ``moleflow benchmark`` parser (jsonargparse, like ``moleflow continual``) and rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from anomalib_moleflow.baselines.settings import FastflowSettings, PadimSettings, PatchcoreSettings
from anomalib_moleflow.engine.options import add_run_options
from anomalib_moleflow.models.moleflow.settings import MoleFlowSettings
from anomalib_moleflow.parser import OptionParser

logger = logging.getLogger(__name__)

#: Every row of the standard table, in order.
ROWS: tuple[str, ...] = (
    "moleflow",
    "fastflow/finetune",
    "fastflow/separate",
    "fastflow/joint",
    "patchcore/finetune",
    "patchcore/separate",
    "patchcore/joint",
    "padim/separate",
)
MODELS: tuple[str, ...] = ("moleflow", "fastflow", "patchcore", "padim")
REGIMES: tuple[str, ...] = ("finetune", "separate", "joint")
#: Settings every row shares (same backbone, stages and image size for every method).
SHARED_KEYS: tuple[str, ...] = ("backbone", "layers", "pre_trained", "image_size")
_SKIPPED = set(SHARED_KEYS)


@dataclass(frozen=True)
class RowSpec:
    """One row: a model in a regime, with an optional label to run variants of the same pair.

    Attributes:
        name: As written in the config: ``moleflow``, ``MODEL/REGIME``, optionally followed by ``#LABEL``.
        model: ``moleflow``, ``fastflow``, ``patchcore`` or ``padim``.
        regime: ``continual`` (MoLE-Flow, frozen base), ``finetune``, ``separate`` or ``joint``.
    """

    name: str
    model: str
    regime: str

    @classmethod
    def parse(cls, name: str) -> RowSpec:
        """Parse ``moleflow``, ``MODEL/REGIME`` or either with ``#LABEL``.

        Raises:
            ValueError: On an unknown model or regime.
        """
        base, _, label = name.partition("#")
        if "#" in name and not label:
            msg = f"Row '{name}': the label after '#' is empty."
            raise ValueError(msg)
        if base == "moleflow":
            return cls(name, "moleflow", "continual")
        model, _, regime = base.partition("/")
        if model == "padim" and regime == "finetune":
            msg = (
                f"Row '{name}': anomalib's Padim fits its Gaussians once and never refits, so it cannot be fine-tuned "
                "task after task; use 'padim/separate' or 'padim/joint'."
            )
            raise ValueError(msg)
        if model not in MODELS[1:] or regime not in REGIMES:
            msg = (
                f"Unknown row '{name}'. Rows are 'moleflow' or MODEL/REGIME with MODEL in {MODELS[1:]} and REGIME in "
                f"{REGIMES}, optionally followed by '#label' (e.g. 'fastflow/separate#wide')."
            )
            raise ValueError(msg)
        return cls(name, model, regime)

    @property
    def base(self) -> str:
        """The name without its label."""
        return self.name.partition("#")[0]

    @property
    def folder(self) -> str:
        """Folder name of the row's outputs."""
        return self.name.replace("/", "_").replace("#", "-")


def benchmark_parser(exit_on_error: bool = True) -> ArgumentParser:
    """Parser of ``moleflow benchmark`` (YAML configs use the same keys; no torch or anomalib import)."""
    parser = OptionParser(
        exit_on_error=exit_on_error,
        prog="moleflow benchmark",
        description="MoLE-Flow vs anomalib's Fastflow, Patchcore and Padim (finetune / separate + router / joint) on "
        "the same task sequence, backbone and image size: one table, one plot.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (same keys as the options).")
    parser.add_argument("--output", type=str, default="results/benchmark", help="Output folder.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--seeds",
        type=list[int] | None,
        default=None,
        help="Run the whole table once per seed (into OUTPUT/seed_N) and write OUTPUT/seeds.md: mean ± half-range.",
    )
    add_run_options(
        parser, "Continue each row after its last finished task (rows keep their state under OUTPUT/rows/)."
    )
    parser.add_argument("--progress_bar", type=bool, default=False)
    parser.add_argument(
        "--threads",
        type=int | None,
        default=None,
        help="torch CPU threads during the run (default: the usable cores not busy with other work, since two jobs "
        "sharing the cores slow small-tensor models such as the flows tenfold).",
    )
    parser.add_argument("--backbone", type=str, default="wide_resnet50_2", help="timm backbone of every row.")
    parser.add_argument("--layers", type=list[str], default=["layer2", "layer3"], help="Backbone stages.")
    parser.add_argument("--pre_trained", type=bool, default=True, help="ImageNet weights.")
    parser.add_argument("--image_size", type=int, default=224, help="Input side length of every row.")
    parser.add_argument("--rows", type=list[str], default=list(ROWS), help=f"Rows to run, from {list(ROWS)}.")
    parser.add_class_arguments(MoleFlowSettings, "moleflow", skip=_SKIPPED)
    parser.add_class_arguments(FastflowSettings, "fastflow")
    parser.add_class_arguments(PatchcoreSettings, "patchcore")
    parser.add_class_arguments(PadimSettings, "padim")
    parser.add_argument(
        "--overrides",
        type=dict[str, dict[str, Any]],
        default={},
        help="Per-model or per-row settings over the shared ones, e.g. {patchcore: {layers: [...]}} or "
        "{'fastflow/separate#big': {image_size: 256}}.",
    )
    parser.add_argument("--timing_images", type=int, default=8, help="Test images per task for inference timing.")
    parser.add_argument(
        "--tasks",
        type=dict | list | None,
        default=None,
        help="{dataset: {class_path, init_args}, categories: [...]}, or a list of them (tasks in order).",
    )
    return parser


def _is_row(name: str) -> bool:
    """Whether ``name`` is a well-formed row name."""
    try:
        RowSpec.parse(name)
    except ValueError:
        return False
    return True


def parse_rows(names: list[str], overrides: dict[str, Any]) -> list[RowSpec]:
    """Rows of the config, checked (unique names; override keys must name a model or a row).

    A labelled row exists only through its override, so a config's overrides for labelled rows that ``names`` leaves
    out (``--rows`` running a subset of the config's rows) are skipped with a log line; any other key that names no
    model or selected row is an error (a typo would otherwise be silently ignored).

    Raises:
        ValueError: On an unknown or repeated row, or an override for nothing.
    """
    rows = [RowSpec.parse(name) for name in names]
    if not rows:
        msg = "rows is empty."
        raise ValueError(msg)
    if len({row.name for row in rows}) != len(rows):
        msg = f"Row names must be unique: {names}."
        raise ValueError(msg)
    known = {*MODELS, *(row.name for row in rows), *(row.base for row in rows)}
    unselected = sorted(key for key in set(overrides) - known if "#" in key and _is_row(key))
    if unselected:
        logger.info("Overrides for rows not run here, skipped: %s.", ", ".join(unselected))
    unknown = sorted(set(overrides) - known - set(unselected))
    if unknown:
        msg = f"overrides for {unknown} match no model or row; use one of {sorted(known)}."
        raise ValueError(msg)
    return rows
