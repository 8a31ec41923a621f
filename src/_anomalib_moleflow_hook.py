"""Start-up hook (loaded by ``anomalib_moleflow.pth``) for anomalib entry points that never import the plugin.

``anomalib benchmark`` resolves ``class_path: anomalib_moleflow.MoleFlow`` with ``get_model``, which refuses modules
outside ``anomalib.models.ALLOWED_MODULES``. This hook waits until ``anomalib.models`` is imported, then adds the
plugin's module name to that set; the plugin itself is imported only when a config names it. It costs one
``sys.meta_path`` entry at start-up and imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

_TARGET = "anomalib.models"
_PLUGIN = "anomalib_moleflow"


class _AllowPluginFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``anomalib.models`` so the plugin is allowed right after that module runs."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_allow(module: ModuleType) -> None:
            exec_module(module)
            allowed = getattr(module, "ALLOWED_MODULES", None)
            if isinstance(allowed, set):
                allowed.add(_PLUGIN)

        spec.loader.exec_module = exec_and_allow  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Install the finder once."""
    if not any(isinstance(finder, _AllowPluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AllowPluginFinder())
