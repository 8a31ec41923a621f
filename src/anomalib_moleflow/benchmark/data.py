"""Benchmark tasks: built like ``moleflow continual``'s from one or several dataset specs; the joint data."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from anomalib import TaskType
from anomalib.data import AnomalibDataModule

from anomalib_moleflow.cli.main import build_tasks
from anomalib_moleflow.continual import Task, resolve_tasks
from anomalib_moleflow.data import TaskGroup


def build_task_list(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Task]:
    """Tasks of one ``{dataset, categories}`` spec (see ``moleflow continual``) or of a list of specs, in order.

    A list lets one benchmark mix datamodule types, e.g. ELPV cell types then generated demo categories.
    """
    specs = [spec] if isinstance(spec, Mapping) else list(spec)
    if not specs:
        msg = "tasks is empty: give at least one {dataset, categories} spec."
        raise ValueError(msg)
    return resolve_tasks([pair for item in specs for pair in build_tasks(dict(item))])


def _concat(datasets: Sequence[Any], task: TaskType) -> Any:
    """One anomalib dataset holding the samples of ``datasets`` (possibly of different dataset classes)."""
    joint = copy.deepcopy(datasets[0])
    joint.samples = pd.concat([dataset.samples for dataset in datasets], ignore_index=True)
    joint.samples.attrs["task"] = task.value
    return joint


class MixedTaskGroup(AnomalibDataModule):
    """All tasks' data in one datamodule when their datamodule types differ (``TaskGroup`` needs one type).

    anomalib datasets only add up when they are of the same class, so the samples tables are concatenated directly.
    The training split holds normal images only, so no mask is needed; validation (thresholds) runs on the
    concatenated test images at image level when some members have no masks.

    Args:
        name: Name of the group.
        datamodules: Members; the first one's batch sizes and workers are used.
    """

    def __init__(self, name: str, datamodules: Sequence[AnomalibDataModule]) -> None:
        first = datamodules[0]
        super().__init__(
            train_batch_size=first.train_batch_size,
            eval_batch_size=first.eval_batch_size,
            num_workers=first.num_workers,
            test_split_mode="from_dir",  # keep the members' normal test images in the test set
            val_split_mode="same_as_test",
        )
        self.members = list(datamodules)
        self.category = name

    def prepare_data(self) -> None:
        """Prepare every member."""
        for datamodule in self.members:
            datamodule.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        for datamodule in self.members:
            datamodule.setup()
        tasks = {datamodule.test_data.task for datamodule in self.members}
        task = tasks.pop() if len(tasks) == 1 else TaskType.CLASSIFICATION
        self.train_data = _concat([datamodule.train_data for datamodule in self.members], task)
        self.test_data = _concat([datamodule.test_data for datamodule in self.members], task)


def joint_datamodule(tasks: Sequence[Task]) -> AnomalibDataModule:
    """Every task's data in one datamodule: a :class:`TaskGroup`, or a :class:`MixedTaskGroup` for mixed types."""
    members = [task.datamodule for task in tasks]
    if len({type(member) for member in members}) == 1:
        return TaskGroup("joint", members)
    return MixedTaskGroup("joint", members)
