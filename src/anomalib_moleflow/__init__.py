"""anomalib-moleflow: MoLE-Flow continual anomaly detection as an anomalib plugin.

Importing the package registers ``MoleFlow`` with anomalib, so that ``anomalib.models.get_model("MoleFlow")``,
``get_model({"class_path": "anomalib_moleflow.MoleFlow"})`` and ``anomalib benchmark`` accept it.
"""

from anomalib_moleflow._registry import register_with_anomalib
from anomalib_moleflow.models import MoleFlow, MoleFlowModel, TaskPostProcessor

__version__ = "0.1.0"

register_with_anomalib()

__all__ = ["MoleFlow", "MoleFlowModel", "TaskPostProcessor", "__version__"]
