"""Benchmark tasks: built like ``moleflow continual``'s from one or several dataset specs; the joint data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


def joint_datamodule(tasks: Sequence[Task]) -> TaskGroup:
    """Every task's data in one datamodule (a :class:`TaskGroup`, which also mixes datamodule types)."""
    return TaskGroup("joint", [task.datamodule for task in tasks])
