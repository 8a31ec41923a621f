"""Registration of the plugin with anomalib's model lookup (done by ``import anomalib_moleflow``).

anomalib only imports classes from modules in ``anomalib.models.ALLOWED_MODULES``, and ``get_model("MoleFlow")``
finds ``MoleFlow`` among the ``AnomalibModule`` subclasses imported so far. Importing ``anomalib.models`` takes
seconds, so the package does not import it: when it is already loaded the plugin registers at once, otherwise right
after it loads (:class:`_AfterImport`). Programs that never import the plugin see anomalib exactly as shipped.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

#: Modules from which anomalib's ``get_model`` may import the plugin's classes.
PLUGIN_MODULES: tuple[str, ...] = ("anomalib_moleflow", "anomalib_moleflow.baselines")
_TARGET = "anomalib.models"
_ANOMALIB_OWN_DEPRECATIONS = r"(Importing from timm\.models\.layers|The anomalib\.models\.components\.dinov2)"


def _register() -> None:
    """Allow the plugin's modules and import ``MoleFlow`` (anomalib.models is loaded)."""
    models = sys.modules[_TARGET]
    models.ALLOWED_MODULES.update(PLUGIN_MODULES)
    try:
        import anomalib_moleflow.models.moleflow.lightning_model  # noqa: F401 (get_model looks it up by name)
    except ImportError as error:  # anomalib.models imported from inside a module that is still loading
        logger.debug("MoleFlow not imported at registration (%s); import anomalib_moleflow.MoleFlow to use it.", error)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run ``callback`` once, right after the module ``name`` has been executed (a post-import hook).

    The standard import system finds and loads the module; this finder only wraps the loader's ``exec_module``.
    """

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        """The module's normal spec, its loader wrapped, for ``name``; ``None`` (not ours) for every other module."""
        del path, target
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_and_register(module: ModuleType) -> None:
            with warnings.catch_warnings():
                # anomalib's model zoo imports two modules that anomalib itself deprecated; the notices are about
                # anomalib's code, not the user's.
                warnings.filterwarnings("ignore", message=_ANOMALIB_OWN_DEPRECATIONS, category=FutureWarning)
                exec_module(module)
            callback()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def register_with_anomalib() -> None:
    """Let anomalib's ``get_model`` (string and dict forms) and its benchmark pipeline find the plugin's models."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_TARGET, _register))
