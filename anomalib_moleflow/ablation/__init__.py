"""Ablation and sweep suites: MAIN plus one override per run, the study's tables, and a summary of suites."""

from .runner import run_suite
from .suite import Run, Suite, load_suite

__all__ = ["Run", "Suite", "load_suite", "run_suite"]
