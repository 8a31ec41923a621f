"""``moleflow benchmark``: how the command runs (its options are :func:`~.config.benchmark_parser`)."""

from __future__ import annotations

from pathlib import Path

from anomalib_moleflow.engine.options import apply_dotted, split_dotted
from anomalib_moleflow.io import claim_output_dir

from .config import benchmark_parser
from .outputs import BENCHMARK_OUTPUTS


def benchmark_command(argv: list[str]) -> str:
    """``moleflow benchmark ARGS``; returns the table it wrote (``seeds.md`` with ``--seeds``)."""
    rest, changes = split_dotted(argv, "tasks")
    config = benchmark_parser().parse_args(rest)
    if changes:
        config.tasks = apply_dotted(config.tasks, changes, "tasks")
    if not (config.resume or config.overwrite):  # refuse at once, before anything loads
        claim_output_dir(config.output, BENCHMARK_OUTPUTS, resume=False, overwrite=False)
    from .runner import run_benchmark

    run_benchmark(config)
    return (Path(config.output) / ("seeds.md" if config.seeds else "benchmark.md")).read_text()
