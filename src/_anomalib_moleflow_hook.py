"""Start-up hook (loaded by ``anomalib_moleflow.pth``) for anomalib entry points that never import the plugin.

``anomalib benchmark`` resolves ``class_path: anomalib_moleflow.MoleFlow`` with ``get_model``, which refuses modules
outside ``anomalib.models.ALLOWED_MODULES``. This hook waits until ``anomalib.models`` is imported, then adds the
plugin's module names to that set; the plugin itself is imported only when a config names it.

anomalib 2.7's ``BenchmarkJob.collect`` builds the results table only when every job reports exactly the same keys,
so a grid of models with different settings or metrics (MoleFlow beside Patchcore and Fastflow) ends in a
``KeyError`` after all jobs ran. When ``anomalib.pipelines.benchmark.job`` is imported, the hook replaces that
``collect`` with one that takes the union of the keys (empty cells where a job has no such key); tables of jobs
that share their keys come out exactly as before.

The hook costs one ``sys.meta_path`` entry at start-up and imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

_MODELS = "anomalib.models"
_BENCHMARK_JOB = "anomalib.pipelines.benchmark.job"
_PLUGIN_MODULES = ("anomalib_moleflow", "anomalib_moleflow.baselines")


def _union_collect(results: list[dict]) -> object:
    """anomalib's benchmark table, one row per job, over the union of the jobs' keys."""
    import pandas as pd

    return pd.DataFrame(results)


def _after_import(module: ModuleType) -> None:
    if module.__name__ == _MODELS:
        allowed = getattr(module, "ALLOWED_MODULES", None)
        if isinstance(allowed, set):
            allowed.update(_PLUGIN_MODULES)
    elif module.__name__ == _BENCHMARK_JOB and hasattr(module, "BenchmarkJob"):
        module.BenchmarkJob.collect = staticmethod(_union_collect)


class _AllowPluginFinder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the two anomalib modules above so they are adjusted right after they run."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in {_MODELS, _BENCHMARK_JOB}:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_adjust(module: ModuleType) -> None:
            exec_module(module)
            _after_import(module)

        spec.loader.exec_module = exec_and_adjust  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Install the finder once."""
    if not any(isinstance(finder, _AllowPluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AllowPluginFinder())
