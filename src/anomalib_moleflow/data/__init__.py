"""Data: the generated offline demo datamodule, task groups, and input checks."""

from .checks import DatasetError, check_datamodule
from .datamodules import SyntheticMVTecAD, TaskGroup

__all__ = ["DatasetError", "SyntheticMVTecAD", "TaskGroup", "check_datamodule"]
