"""``moleflow ablate``: its options (no torch or anomalib import) and how the command runs."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from anomalib_moleflow.parser import OptionParser


def ablate_parser() -> ArgumentParser:
    """Options of ``moleflow ablate``."""
    parser = OptionParser(
        prog="moleflow ablate",
        description="Run an ablation or sweep suite (MAIN plus one override per run) into tables.",
    )
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
    parser.add_argument(
        "--threads",
        type=int | None,
        default=None,
        help="torch CPU threads of each run (default: the config's threads, else automatic with serial, one per "
        "run with ray).",
    )
    parser.add_argument(
        "--executor",
        type=Literal["serial", "ray"],
        default="serial",
        help="serial: one run after the other in this process; ray: each run one Ray task (one GPU each on a "
        "cluster with GPUs, else one CPU), retried when its worker dies. ray needs anomalib-moleflow[distributed].",
    )
    parser.add_argument(
        "--address",
        type=str | None,
        default=None,
        help="With --executor ray: the Ray cluster to use (HEAD:6379); default: the one `ray start` started on "
        "this machine, else a local one started now.",
    )
    return parser


def ablate_command(argv: Sequence[str]) -> str:
    """``moleflow ablate ARGS``; returns the table it wrote (the suite's, or the summary)."""
    config = ablate_parser().parse_args(list(argv))
    if config.summary:
        from anomalib_moleflow.reports.ablation_table import write_summary

        return write_summary(config.summary).read_text()
    if not (config.suite or config.config):
        msg = "Pass --suite NAME (a file of configs/ablations/), --config FILE, or --summary FOLDER."
        raise ValueError(msg)
    if config.address is not None and config.executor != "ray":
        msg = "--address is the Ray cluster of --executor ray; pass --executor ray with it."
        raise ValueError(msg)
    if config.executor == "ray" and importlib.util.find_spec("ray") is None:
        from .suite import INSTALL_RAY

        raise ModuleNotFoundError(INSTALL_RAY)
    from .suite import load_suite, suite_path, validate

    suite = load_suite(config.config or suite_path(config.suite), config.base)
    validate(suite, config.scale, Path(config.output) / "data")  # a typo fails now, not after the other runs

    from .runner import run_suite

    run_suite(suite, config.output, config.scale, config.executor, config.address, config.threads)
    return (Path(config.output) / suite.name / "suite.md").read_text()
