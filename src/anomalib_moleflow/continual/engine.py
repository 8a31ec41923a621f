"""Continual engine: learn tasks one after another, test every task seen so far with routing, report.

Each task is trained by a fresh anomalib ``Engine`` (a second ``fit`` on the same Engine does nothing) on that
task's training images only. After every task, the model checkpoint and the partial results are written
atomically, so ``resume=True`` continues after the last finished task.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_moleflow.data import TaskGroup, check_datamodule
from anomalib_moleflow.models import MoleFlow

from .results import METRICS, _clean, atomic_write_text, summarize, write_results

logger = logging.getLogger(__name__)

TaskLike = AnomalibDataModule | tuple[str, AnomalibDataModule | Sequence[AnomalibDataModule]]
STATE_FILE = "state.json"
CHECKPOINT_FILE = "model.ckpt"


@dataclass
class Task:
    """One task of the sequence: a name and the datamodule holding its images."""

    name: str
    datamodule: AnomalibDataModule


def resolve_tasks(
    tasks: Sequence[TaskLike] | Mapping[str, AnomalibDataModule | Sequence[AnomalibDataModule]],
) -> list[Task]:
    """Normalise the accepted task forms into named tasks.

    Accepted: a list of datamodules (named after their category), a list of ``(name, datamodule or list)``, or a
    mapping ``name -> datamodule or list``; a list of datamodules becomes a :class:`TaskGroup`.
    """
    items = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)
    resolved: list[Task] = []
    for item in items:
        if isinstance(item, AnomalibDataModule):
            name, datamodule = str(item.category or f"task_{len(resolved)}"), item
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


def _members(datamodule: AnomalibDataModule) -> list[AnomalibDataModule]:
    return datamodule.members if isinstance(datamodule, TaskGroup) else [datamodule]


def task_engine(
    root_dir: Path,
    accelerator: str,
    devices: int | str,
    enable_progress_bar: bool,
    **trainer_kwargs: Any,
) -> Engine:
    """A fresh anomalib ``Engine`` for one fit or test (a second ``fit`` on the same Engine does nothing).

    ``save_top_k=0`` replaces anomalib's default ModelCheckpoint: callers keep or save the model themselves.
    """
    return Engine(
        default_root_dir=root_dir,
        logger=False,
        accelerator=accelerator,
        devices=devices,
        enable_progress_bar=enable_progress_bar,
        callbacks=[ModelCheckpoint(save_top_k=0)],
        **trainer_kwargs,
    )


class ContinualEngine:
    """Run MoLE-Flow (or any strategy of it) over a task sequence, like the study's protocol.

    Args:
        output_dir: Where checkpoints, results, plots and overlays go.
        seed: Seed; each task ``i`` trains under ``seed + i`` so that resumed runs equal uninterrupted ones.
        routing: ``"router"`` (the model picks each image's task) or ``"oracle"`` (true task, for ablations).
        resume: Continue after the last finished task recorded in ``output_dir``.
        accelerator: Lightning accelerator.
        devices: Lightning devices.
        enable_progress_bar: Lightning's progress bars inside a task.
        overlays_per_task: Anomaly-map overlays saved per task at the end (0: none).
        config: Extra configuration to store in ``results.json`` (the CLI passes the whole resolved config).
    """

    def __init__(
        self,
        output_dir: str | Path = "results/continual",
        seed: int = 42,
        routing: Literal["router", "oracle"] = "router",
        resume: bool = False,
        accelerator: str = "auto",
        devices: int | str = 1,
        enable_progress_bar: bool = True,
        overlays_per_task: int = 4,
        config: dict[str, Any] | None = None,
    ) -> None:
        if routing not in {"router", "oracle"}:
            msg = f"routing must be 'router' or 'oracle', got {routing!r}."
            raise ValueError(msg)
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.routing = routing
        self.resume = resume
        self.accelerator = accelerator
        self.devices = devices
        self.enable_progress_bar = enable_progress_bar
        self.overlays_per_task = overlays_per_task
        self.config = config or {}

    # ---------------------------------------------------------------- helpers
    def _engine(self, task_dir: Path) -> Engine:
        return task_engine(task_dir, self.accelerator, self.devices, self.enable_progress_bar)

    def _model_config(self, model: MoleFlow) -> dict[str, Any]:
        return {key: value for key, value in dict(model.hparams).items() if not key.startswith("_")}

    def _run_config(self, model: MoleFlow, tasks: list[Task]) -> dict[str, Any]:
        return {
            "engine": {
                "seed": self.seed,
                "routing": self.routing,
                "accelerator": self.accelerator,
                "devices": self.devices,
            },
            "model": json.loads(json.dumps(self._model_config(model), default=str)),
            "tasks": [
                {
                    "name": t.name,
                    "datamodules": [f"{type(m).__name__}:{getattr(m, 'category', '')}" for m in _members(t.datamodule)],
                }
                for t in tasks
            ],
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            **self.config,
        }

    def _test(
        self,
        model: MoleFlow,
        task: Task,
        index: int,
        task_dir: Path,
    ) -> tuple[dict[str, float | None], float, Engine]:
        """Test one task with routing (or oracle); returns metrics, routing accuracy and the engine used."""
        model.oracle_task = index
        model.reset_routing_log()
        visualizer, model.visualizer = model.visualizer, None  # overlays are drawn once at the end
        engine = self._engine(task_dir)
        try:
            output = engine.test(model, datamodule=task.datamodule, verbose=False)
        finally:
            model.visualizer = visualizer
        metrics = output[0] if output else {}
        routed = model.routed_tasks()
        accuracy = float((routed == index).float().mean()) if routed.numel() else float("nan")
        return {metric: _clean(metrics.get(metric)) for metric in METRICS}, accuracy, engine

    def _save(self, engine: Engine, state: dict[str, Any]) -> None:
        """Checkpoint (via the last engine that ran the model) then state, each atomically.

        The state is written last, so it never names a task whose checkpoint is incomplete.
        """
        checkpoint = self.output_dir / CHECKPOINT_FILE
        tmp = checkpoint.with_suffix(".ckpt.tmp")
        engine.trainer.save_checkpoint(tmp)
        tmp.replace(checkpoint)
        atomic_write_text(self.output_dir / STATE_FILE, json.dumps(state, indent=2))

    def _load_state(self, model: MoleFlow, tasks: list[Task], config: dict[str, Any]) -> dict[str, Any] | None:
        path = self.output_dir / STATE_FILE
        if not (self.resume and path.exists()):
            return None
        state = json.loads(path.read_text())
        if state["config"]["model"] != config["model"]:
            msg = (
                f"Cannot resume: '{self.output_dir}' was produced with another model configuration. Use the same "
                "configuration, or another --output for a new run."
            )
            raise ValueError(msg)
        done = state["tasks"]
        if done != [t.name for t in tasks][: len(done)]:
            msg = f"Cannot resume: finished tasks {done} are not a prefix of the requested tasks."
            raise ValueError(msg)
        checkpoint = torch.load(self.output_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        logger.info("Resumed after %d finished task(s): %s", len(done), done)
        return state

    # -------------------------------------------------------------------- run
    def run(
        self,
        model: MoleFlow,
        tasks: Sequence[TaskLike] | Mapping[str, AnomalibDataModule | Sequence[AnomalibDataModule]],
        stop_after: int | None = None,
    ) -> dict[str, Any]:
        """Learn ``tasks`` in order; after each, test every task seen so far.

        Args:
            model: A MoleFlow model. It may already hold tasks (learned earlier, e.g. loaded from a checkpoint):
                those are tested but never retrained, and their data is not needed for training.
            tasks: The task sequence (see :func:`resolve_tasks`). Tasks already in the model must come first.
            stop_after: Stop after this many tasks in total (to simulate an interruption, or to split a run).

        Returns:
            The results dictionary also written to ``output_dir/results.json``.
        """
        task_list = resolve_tasks(tasks)
        for task in task_list:
            for member in _members(task.datamodule):
                check_datamodule(member)
        model.routing = self.routing
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = self._run_config(model, task_list)
        state = self._load_state(model, task_list, config) or {
            "tasks": [],
            "matrix": {metric: [] for metric in METRICS},
            "routing": [],
            "timing": {"fit_s": {}, "test_s": {}},
            "config": config,
        }
        known = model.task_names
        if known and known != [t.name for t in task_list][: len(known)]:
            msg = f"The model already holds tasks {known}; the task list must start with them."
            raise ValueError(msg)
        start = len(state["tasks"])
        end = len(task_list) if stop_after is None else min(stop_after, len(task_list))
        run_start = time.perf_counter()
        for index in range(start, end):
            task = task_list[index]
            task_dir = self.output_dir / "tasks" / f"{index:02d}_{task.name}"
            seed_everything(self.seed + index, workers=True, verbose=False)
            fit_start = time.perf_counter()
            if task.name in model.task_names:
                logger.info("Task '%s' is already learned; not retraining it.", task.name)
            else:
                model.add_task(task.name)
                self._engine(task_dir).fit(model, datamodule=task.datamodule)
            state["timing"]["fit_s"][task.name] = time.perf_counter() - fit_start
            test_start = time.perf_counter()
            row: dict[str, list[float | None]] = {metric: [None] * len(task_list) for metric in METRICS}
            routing_row: list[float | None] = [None] * len(task_list)
            for j in range(index + 1):
                values, accuracy, engine = self._test(model, task_list[j], j, task_dir / "test" / task_list[j].name)
                for metric in METRICS:
                    row[metric][j] = values[metric]
                routing_row[j] = _clean(accuracy)
            state["timing"]["test_s"][task.name] = time.perf_counter() - test_start
            state["tasks"].append(task.name)
            for metric in METRICS:
                state["matrix"][metric].append(row[metric])
            state["routing"].append(routing_row)
            self._save(engine, state)
            self._progress(state, index, end, run_start, start)
        return self.finish(model, task_list[: len(state["tasks"])], state)

    def _progress(self, state: dict[str, Any], index: int, end: int, run_start: float, start: int) -> None:
        elapsed = time.perf_counter() - run_start
        done = index + 1 - start
        eta = elapsed / done * (end - index - 1)

        def mean_so_far(metric: str) -> str:
            values = [v for v in state["matrix"][metric][-1][: index + 1] if v is not None]
            return f"{100 * sum(values) / len(values):.2f}" if values else "n/a"

        routing = [v for v in state["routing"][-1] if v is not None]
        message = (
            f"[task {index + 1}/{end}] {state['tasks'][-1]}: elapsed {elapsed:.0f}s, ETA {eta:.0f}s | mean so far: "
            f"img AUROC {mean_so_far('image_AUROC')}, pix AUROC {mean_so_far('pixel_AUROC')}, "
            f"pix AP {mean_so_far('pixel_AUPR')}, routing {100 * sum(routing) / max(1, len(routing)):.1f}%"
        )
        print(message, flush=True)

    def finish(self, model: MoleFlow, tasks: list[Task], state: dict[str, Any]) -> dict[str, Any]:
        """Build and write the results, plots and overlays from the recorded state."""
        from anomalib_moleflow.reports import plot_final_bars, plot_matrix_heatmaps, save_overlays

        names = state["tasks"]
        n = len(names)
        matrix = {metric: [row[:n] for row in rows] for metric, rows in state["matrix"].items()}
        routing = [row[:n] for row in state["routing"]]
        results = {
            "tasks": names,
            "matrix": matrix,
            **summarize(names, matrix, routing),
            "routing_matrix": routing,
            "params": model.model.parameter_report(),
            "timing": state["timing"],
            "config": state["config"],
        }
        write_results(results, self.output_dir)
        plot_matrix_heatmaps(results, self.output_dir)
        plot_final_bars(results, self.output_dir)
        if self.overlays_per_task > 0:
            for index, task in enumerate(tasks):
                model.oracle_task = index
                save_overlays(model, task.datamodule, task.name, self.output_dir, self.overlays_per_task)
        return results
