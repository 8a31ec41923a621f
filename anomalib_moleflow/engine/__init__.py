"""The continual protocol (one engine) and the strategies it runs: MoLE-Flow and anomalib baseline regimes."""

from .continual import CHECKPOINT_FILE, STATE_FILE, ContinualEngine
from .strategies import (
    FinetuneStrategy,
    JointStrategy,
    MoleFlowStrategy,
    SeparateStrategy,
    Strategy,
    check_finite,
)
from .trainer import TaskTrainer

__all__ = [
    "CHECKPOINT_FILE",
    "STATE_FILE",
    "ContinualEngine",
    "FinetuneStrategy",
    "JointStrategy",
    "MoleFlowStrategy",
    "SeparateStrategy",
    "Strategy",
    "TaskTrainer",
    "check_finite",
]
