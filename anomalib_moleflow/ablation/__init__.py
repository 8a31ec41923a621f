"""Ablation and sweep suites: MAIN plus one override per run, the study's tables, and a summary of suites."""

import lazy_loader

# Submodules load on first use: the `moleflow` command answers --help without importing torch or anomalib.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "runner": ["run_suite"],
        "suite": ["Run", "Suite", "load_suite"],
    },
)
