"""Models of the anomalib-moleflow plugin."""

from .moleflow import MoleFlow, MoleFlowModel, TaskPostProcessor

__all__ = ["MoleFlow", "MoleFlowModel", "TaskPostProcessor"]
