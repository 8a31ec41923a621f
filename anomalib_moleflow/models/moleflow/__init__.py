"""MoLE-Flow model (anomalib layout: lightning_model, torch_model, loss, anomaly_map, components)."""

from .lightning_model import MoleFlow
from .post_processor import TaskPostProcessor
from .torch_model import MoleFlowModel

__all__ = ["MoleFlow", "MoleFlowModel", "TaskPostProcessor"]
