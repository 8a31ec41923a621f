"""anomalib-moleflow: MoLE-Flow continual anomaly detection as an anomalib plugin.

Importing the package registers it with anomalib (see :mod:`anomalib_moleflow.models.registry`), so that
``anomalib.models.get_model("MoleFlow")`` and ``get_model({"class_path": "anomalib_moleflow.MoleFlow"})`` work.
The model itself (torch, anomalib) loads on first use, so that the ``moleflow`` command starts in a fraction of a
second.
"""

import lazy_loader

from anomalib_moleflow.models.registry import register_with_anomalib

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={"models": ["MoleFlow", "MoleFlowModel", "OracleRouting", "TaskPostProcessor"]},
)
__all__ += ["__version__"]

register_with_anomalib()
