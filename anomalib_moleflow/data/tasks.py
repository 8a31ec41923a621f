"""Tasks of a continual run: named datamodules, built from a config's ``tasks:`` section or given directly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anomalib.data import AnomalibDataModule, Folder
from lightning.pytorch.cli import instantiate_class

from .datamodules import TaskGroup

TaskLike = AnomalibDataModule | tuple[str, AnomalibDataModule | Sequence[AnomalibDataModule]]
TASK_SPEC_KEYS = ("dataset", "categories", "task")


@dataclass
class Task:
    """One task of the sequence: a name and the datamodule holding its images."""

    name: str
    datamodule: AnomalibDataModule

    @property
    def members(self) -> list[AnomalibDataModule]:
        """The datamodules the task is made of (one, or a :class:`TaskGroup`'s members)."""
        return list(self.datamodule.members) if isinstance(self.datamodule, TaskGroup) else [self.datamodule]


def datamodule_task_name(datamodule: AnomalibDataModule, index: int) -> str:
    """A task's name from its datamodule: its category (MVTec AD, VisA...), else a ``Folder``'s own ``name``, else
    ``task_INDEX`` (anomalib's ``Folder`` has an empty category; its ``name`` is what the user called it)."""
    category = str(getattr(datamodule, "category", "") or "")
    if category:
        return category
    if isinstance(datamodule, Folder) and datamodule.name:
        return str(datamodule.name)
    return f"task_{index}"


def resolve_tasks(
    tasks: Sequence[TaskLike] | Mapping[str, AnomalibDataModule | Sequence[AnomalibDataModule]],
) -> list[Task]:
    """Normalise the accepted task forms into named tasks.

    Accepted: a list of datamodules (named after their category), a list of ``(name, datamodule or list)``, a
    mapping ``name -> datamodule or list``, or :class:`Task` objects; a list of datamodules becomes a
    :class:`TaskGroup`.

    Raises:
        ValueError: If there is no task or two tasks share a name.
    """
    items = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)
    resolved: list[Task] = []
    for item in items:
        if isinstance(item, Task):
            resolved.append(item)
            continue
        if isinstance(item, AnomalibDataModule):
            name, datamodule = datamodule_task_name(item, len(resolved)), item
        else:
            name, members = item
            if isinstance(members, AnomalibDataModule):
                datamodule = members
            else:
                datamodule = members[0] if len(members) == 1 else TaskGroup(name, members)
        resolved.append(Task(str(name), datamodule))
    names = [task.name for task in resolved]
    if not resolved:
        msg = "No task given: pass at least one datamodule."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"Task names must be unique, got {names}."
        raise ValueError(msg)
    return resolved


def _spec_tasks(spec: Mapping[str, Any]) -> list[tuple[str, list[AnomalibDataModule]]]:
    unknown = sorted(set(spec) - set(TASK_SPEC_KEYS))
    if unknown:
        msg = f"Unknown key(s) {unknown} in the `tasks:` section; its keys are {list(TASK_SPEC_KEYS)}."
        raise ValueError(msg)
    dataset = dict(spec.get("dataset") or {})
    if "class_path" not in dataset:
        msg = "tasks.dataset.class_path is required (e.g. anomalib.data.MVTecAD)."
        raise ValueError(msg)
    unknown = sorted(set(dataset) - {"class_path", "init_args"})
    if unknown:
        msg = f"Unknown key(s) {unknown} in `tasks.dataset`; its keys are ['class_path', 'init_args']."
        raise ValueError(msg)
    categories = spec.get("categories") or []
    if not categories:
        msg = "tasks.categories is empty: list the categories to learn, one task each."
        raise ValueError(msg)

    def make(category: str) -> AnomalibDataModule:
        # Built per category, so no two datamodules share an argument object (a transform may keep state).
        args = _instantiated({**dict(dataset.get("init_args") or {}), "category": category}, "tasks.dataset.init_args")
        return instantiate_class((), {"class_path": dataset["class_path"], "init_args": args})

    tasks: list[tuple[str, list[AnomalibDataModule]]] = []
    for entry in categories:
        if isinstance(entry, str):
            tasks.append((entry, [make(entry)]))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            name, members = next(iter(entry.items()))
            tasks.append((str(name), [make(c) for c in members]))
        else:
            members = list(entry)
            tasks.append(("+".join(members), [make(c) for c in members]))
    return tasks


def _instantiated(value: Any, where: str) -> Any:
    """``value`` with every ``{class_path, init_args}`` mapping in it built, as anomalib's CLI builds a datamodule's
    arguments (e.g. ``train_augmentations: {class_path: torchvision.transforms.v2.RandomAffine, init_args: ...}``).

    Lightning's ``instantiate_class`` builds only the outer class and would hand the datamodule a plain dict.

    Raises:
        ValueError: When a ``class_path`` does not import or its class refuses its ``init_args``.
    """
    if isinstance(value, Mapping) and "class_path" in value and set(value) <= {"class_path", "init_args"}:
        args = {key: _instantiated(arg, f"{where}.{key}") for key, arg in dict(value.get("init_args") or {}).items()}
        try:
            return instantiate_class((), {"class_path": value["class_path"], "init_args": args})
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            msg = f"{where}: cannot build {value['class_path']} ({error}); check its class_path and init_args."
            raise ValueError(msg) from error
    if isinstance(value, Mapping):
        return {key: _instantiated(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_instantiated(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def build_tasks(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Task]:
    """Tasks from a config's ``tasks:`` section: one datamodule per category, in order.

    ``spec`` is ``{"dataset": {"class_path": ..., "init_args": {...}}, "categories": [...]}`` or a list of such
    specs (their tasks follow each other, e.g. ELPV cell types then MVTec AD categories). A category entry that is a
    list (or ``{name: [...]}``) makes one task of several categories (a :class:`TaskGroup`). A spec with
    ``task: NAME`` puts all its categories into the one task ``NAME``; specs that give the same ``task`` form that
    task together (at the place of the first), so one task can hold categories of different datasets or roots.

    Raises:
        ValueError: On a missing or unknown key, or an empty category list.
    """
    specs = [spec] if isinstance(spec, Mapping) else list(spec)
    if not specs:
        msg = "tasks is empty: give at least one {dataset, categories} spec."
        raise ValueError(msg)
    pairs: list[tuple[str, list[AnomalibDataModule]]] = []
    named: dict[str, list[AnomalibDataModule]] = {}
    for item in specs:
        tasks = _spec_tasks(item)
        if item.get("task") is None:
            pairs.extend(tasks)
            continue
        name = item["task"]
        if not isinstance(name, str) or not name:
            msg = f"tasks.task must be a non-empty task name, got {name!r}."
            raise ValueError(msg)
        members = [member for _, datamodules in tasks for member in datamodules]
        if name in named:
            named[name].extend(members)
        else:
            named[name] = members
            pairs.append((name, members))
    return resolve_tasks(pairs)


def joint_datamodule(tasks: Sequence[Task]) -> TaskGroup:
    """Every task's data in one datamodule (a :class:`TaskGroup`, which also mixes datamodule types)."""
    return TaskGroup("joint", [task.datamodule for task in tasks])
