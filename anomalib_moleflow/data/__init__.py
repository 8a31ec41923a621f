"""Data: task sequences, the generated offline demo datamodule, ELPV, task groups, and input checks."""

from .checks import DatasetError, check_datamodule
from .datamodules import SyntheticMVTecAD, TaskGroup
from .tasks import Task, TaskLike, build_tasks, joint_datamodule, resolve_tasks

__all__ = [
    "DatasetError",
    "SyntheticMVTecAD",
    "Task",
    "TaskGroup",
    "TaskLike",
    "build_tasks",
    "check_datamodule",
    "joint_datamodule",
    "resolve_tasks",
]
