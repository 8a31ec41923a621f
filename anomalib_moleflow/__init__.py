"""anomalib-moleflow: MoLE-Flow continual anomaly detection as an anomalib plugin.

Importing the package registers it with anomalib (see :mod:`anomalib_moleflow.registry`), so that
``anomalib.models.get_model("MoleFlow")`` and ``get_model({"class_path": "anomalib_moleflow.MoleFlow"})`` work.
"""

import warnings

with warnings.catch_warnings():
    # Loading anomalib's model zoo imports two modules that anomalib itself deprecated; the notices are about
    # anomalib's code, not the user's, and would otherwise open every command's output.
    warnings.filterwarnings(
        "ignore",
        message=r"(Importing from timm\.models\.layers|The anomalib\.models\.components\.dinov2)",
        category=FutureWarning,
    )
    from anomalib_moleflow.models import MoleFlow, MoleFlowModel, TaskPostProcessor

from anomalib_moleflow.registry import register_with_anomalib

__version__ = "0.1.0"

register_with_anomalib()

__all__ = ["MoleFlow", "MoleFlowModel", "TaskPostProcessor", "__version__"]
