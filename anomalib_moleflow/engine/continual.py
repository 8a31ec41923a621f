"""Continual engine: learn tasks one after another, test every task seen so far, report.

The protocol is written here once, for MoLE-Flow and for every baseline regime (:mod:`.strategies`): for task
``i``, the strategy learns it (a fresh anomalib ``Engine`` per fit), then every task the strategy tests after ``i``
(by default ``0..i``) is tested with anomalib's metrics and routing accuracy is read from the routing log. After
every task the strategy's checkpoint and the run's state are written atomically, so ``resume=True`` continues after
the last finished task.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import AnomalibDataModule
from lightning.pytorch import seed_everything

from anomalib_moleflow.checkpoint import checksum_path, write_checksum
from anomalib_moleflow.data import Task, TaskLike, check_datamodule, resolve_tasks
from anomalib_moleflow.distributed import gather_in_order, is_rank_zero, world_size
from anomalib_moleflow.io import atomic_write, atomic_write_text, claim_output_dir
from anomalib_moleflow.metrics import GOOD_FLAGGED, METRICS
from anomalib_moleflow.models import MoleFlow, OracleRouting
from anomalib_moleflow.models.moleflow.components.router import Routed, RoutingLog
from anomalib_moleflow.models.moleflow.settings import INTRODUCED_SETTINGS, differences
from anomalib_moleflow.reports import (
    clean,
    plot_final_bars,
    plot_matrix_heatmaps,
    save_overlays,
    summarize,
    write_results,
    write_routing_csv,
)

from .options import CHECKPOINT_FILE, RUN_OUTPUTS, STATE_FILE
from .strategies import MoleFlowStrategy, Strategy
from .trainer import TaskTrainer

logger = logging.getLogger(__name__)

Tasks = Sequence[TaskLike | Task] | Mapping[str, AnomalibDataModule | Sequence[AnomalibDataModule]]


class ContinualEngine:
    """Run a strategy (MoLE-Flow by default) over a task sequence, with the study's protocol.

    Args:
        output_dir: Where checkpoints, results, plots and overlays go.
        seed: Seed; each task ``i`` trains under ``seed + i`` so that resumed runs equal uninterrupted ones.
        resume: Continue after the last finished task recorded in ``output_dir``.
        overwrite: Delete an earlier run's outputs in ``output_dir`` first. Without it (or ``resume``), a folder that
            holds an earlier run is refused, so that runs never mix or silently replace each other.
        accelerator: Lightning accelerator.
        devices: Lightning devices.
        enable_progress_bar: Lightning's progress bars inside a task.
        precision: Lightning precision of every fit and test (``"bf16-mixed"``, ``"16-mixed"``); ``None``: float32.
        lightning_strategy: Lightning strategy of every fit and test (``"ddp"`` with several devices: every process
            runs the sequence on its shard, the ranks' statistics are combined, rank 0 alone writes the outputs).
        overlays_per_task: Anomaly-map overlays saved per task at the end (0: none).
        config: Extra configuration to store in ``results.json`` (the CLI passes the whole resolved config).
    """

    def __init__(
        self,
        output_dir: str | Path = "results/continual",
        seed: int = 42,
        resume: bool = False,
        overwrite: bool = False,
        accelerator: str = "auto",
        devices: int | str = 1,
        enable_progress_bar: bool = True,
        overlays_per_task: int = 4,
        config: dict[str, Any] | None = None,
        precision: str | None = None,
        lightning_strategy: str = "auto",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.resume = resume
        self.overwrite = overwrite
        self.trainer = TaskTrainer(accelerator, devices, enable_progress_bar, precision, lightning_strategy)
        self.overlays_per_task = overlays_per_task
        self.config = config or {}

    # ---------------------------------------------------------------- helpers
    def _run_config(self, strategy: Strategy, tasks: list[Task]) -> dict[str, Any]:
        config = {
            "engine": {
                "seed": self.seed,
                "accelerator": self.trainer.accelerator,
                "devices": self.trainer.devices,
                "strategy": self.trainer.strategy,
                "precision": self.trainer.precision,
            },
            **strategy.describe(),
            "tasks": [
                {"name": t.name, "datamodules": [f"{type(m).__name__}:{getattr(m, 'category', '')}" for m in t.members]}
                for t in tasks
            ],
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            **self.config,
        }
        return json.loads(json.dumps(config, default=str))

    def _test(
        self, strategy: Strategy, index: int, task: Task, folder: Path, names: list[str]
    ) -> tuple[dict[str, Any], float | None, float | None]:
        """Test one task; returns its metrics (``None`` where undefined; :data:`GOOD_FLAGGED` included), routing
        accuracy and unknown-product rate.

        The routing of every test image (task, router distance, unknown product) goes to ``folder/routing.csv``.
        """
        true_task = strategy.true_task(index)
        oracle = [] if true_task is None else [OracleRouting(true_task)]  # the true task comes with each batch
        with strategy.testing(index) as (module, routing_log):
            metrics = self.trainer.test(module, task.datamodule, folder, strategy.calibrate, oracle)
        values = {metric: clean(metrics.get(metric)) for metric in (*METRICS, GOOD_FLAGGED)}
        if routing_log is None:
            return values, None, None
        images = [str(path) for path in task.datamodule.test_data.samples["image_path"]]
        if world_size() > 1:  # each rank routed its shard: every image's routing, in the dataset's order
            routed = (gather_in_order(t, len(images)) for t in routing_log.routed())
            routing_log = RoutingLog.of(Routed(*routed))
        routing = {
            "task": routing_log.tasks().tolist(),
            "distance": routing_log.distances().tolist(),
            "unknown": routing_log.unknown().tolist(),
        }
        if len(images) == len(routing["task"]) and is_rank_zero():  # the test loader keeps the samples' order
            write_routing_csv(folder / "routing.csv", images, routing, names)
        return values, clean(routing_log.accuracy(index)), clean(routing_log.unknown_rate())

    def _save(self, strategy: Strategy, state: dict[str, Any]) -> None:
        """Checkpoint, its checksum, then state, each atomically: the state never names an incomplete checkpoint.

        Under DDP the other ranks only join Lightning's checkpoint call (rank 0 writes, all wait at its barrier).
        """
        if not is_rank_zero():
            strategy.save(Path(os.devnull), self.trainer)
            return
        # The old checksum goes first: a crash before the new one is written leaves a checkpoint without a checksum
        # (accepted), never one with a stale checksum (refused as damaged).
        checksum_path(self.output_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        checkpoint = atomic_write(self.output_dir / CHECKPOINT_FILE, lambda path: strategy.save(path, self.trainer))
        write_checksum(checkpoint)
        atomic_write_text(self.output_dir / STATE_FILE, json.dumps(state, indent=2))

    def _load_state(self, strategy: Strategy, tasks: list[Task], config: dict[str, Any]) -> dict[str, Any] | None:
        path = self.output_dir / STATE_FILE
        if not (self.resume and path.exists()):
            return None
        state = json.loads(path.read_text())
        # The CLI's own options (output, resume ...), library versions and speed-only settings (caches) may differ.
        ignored = {"cli", "versions", "speed"}
        saved = {key: value for key, value in state["config"].items() if key not in ignored}
        if isinstance(saved.get("model"), dict):  # a run recorded before a setting existed did what its value says
            saved["model"] = {**INTRODUCED_SETTINGS, **saved["model"]}
        current = {key: value for key, value in config.items() if key not in ignored}
        differing = [f"{key}: run {old!r}, now {new!r}" for key, old, new in differences(saved, current)]
        if differing:
            msg = (
                f"Cannot resume: '{self.output_dir}' was produced with other settings ({'; '.join(differing)}). "
                "Resume with the same configuration, or start a new run with another --output (or --overwrite)."
            )
            raise ValueError(msg)
        done = state["tasks"]
        if done != [t.name for t in tasks][: len(done)]:
            msg = f"Cannot resume: finished tasks {done} are not a prefix of the requested tasks."
            raise ValueError(msg)
        strategy.load(self.output_dir / CHECKPOINT_FILE)
        logger.info("Resumed after %d finished task(s): %s", len(done), done)
        return state

    # -------------------------------------------------------------------- run
    def run(self, strategy: Strategy | MoleFlow, tasks: Tasks, stop_after: int | None = None) -> dict[str, Any]:
        """Learn ``tasks`` in order; after each, test the tasks the strategy tests (every task seen so far).

        Args:
            strategy: A :class:`Strategy`, or a MoleFlow model (routed :class:`MoleFlowStrategy`). A model may
                already hold tasks (learned earlier, e.g. loaded from a checkpoint): those are tested but never
                retrained, and their data is not needed for training.
            tasks: The task sequence (see :func:`~anomalib_moleflow.data.resolve_tasks`). Tasks already learned
                must come first.
            stop_after: Stop after this many tasks in total (to simulate an interruption, or to split a run).

        Returns:
            The results dictionary also written to ``output_dir/results.json``.
        """
        if isinstance(strategy, MoleFlow):
            strategy = MoleFlowStrategy(strategy)
        task_list = resolve_tasks(tasks)
        for task in task_list:
            for member in task.members:
                check_datamodule(member)
        config = self._run_config(strategy, task_list)
        state = self._load_state(strategy, task_list, config) or {
            "tasks": [],
            "matrix": {metric: [] for metric in METRICS},
            "routing": [],
            "timing": {"fit_s": {}, "test_s": {}},
            "config": config,
        }
        known = strategy.learned()
        if known and known != [t.name for t in task_list][: len(known)]:
            msg = f"The model already holds tasks {known}; the task list must start with them."
            raise ValueError(msg)
        refits = {index: strategy.stale_statistics(index) for index in range(len(task_list))}
        # Last of the checks, so that an error above never costs an earlier run's outputs (resume: a no-op). Under
        # DDP the other ranks start inside rank 0's first Lightning call, into the folder rank 0 has claimed.
        if is_rank_zero():
            claim_output_dir(self.output_dir, RUN_OUTPUTS, self.resume, self.overwrite)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        with strategy.session(task_list, self.output_dir):
            for index, module in refits.items():  # statistics fitted with other scoring settings: fit them again
                if module is None:
                    continue
                task = task_list[index]
                folder = self.output_dir / "tasks" / f"{index:02d}_{task.name}" / "statistics"
                self.trainer.validate(module, task.datamodule, folder, [OracleRouting(index)])
                if strategy.stale_statistics(index) is not None:
                    msg = (
                        f"Task '{task.name}' has no validation images to fit its thresholds again with the new scoring "
                        "settings: give its datamodule a validation split, or keep the checkpoint's scoring settings."
                    )
                    raise ValueError(msg)
                logger.info(
                    "Task %d '%s': thresholds and normalisation fitted again (new scoring settings).", index, task.name
                )
            return self._run(strategy, task_list, state, stop_after)

    def _run(
        self, strategy: Strategy, task_list: list[Task], state: dict[str, Any], stop_after: int | None
    ) -> dict[str, Any]:
        start = len(state["tasks"])
        end = len(task_list) if stop_after is None else min(stop_after, len(task_list))
        run_start = time.perf_counter()
        for index in range(start, end):
            task = task_list[index]
            task_dir = self.output_dir / "tasks" / f"{index:02d}_{task.name}"
            seed_everything(self.seed + index, workers=True, verbose=False)
            fit_start = time.perf_counter()
            strategy.learn(index, task, self.trainer, task_dir)
            state["timing"]["fit_s"][task.name] = time.perf_counter() - fit_start
            test_start = time.perf_counter()
            row: dict[str, list[float | None]] = {metric: [None] * len(task_list) for metric in METRICS}
            routing_row: list[float | None] = [None] * len(task_list)
            unknown_row: list[float | None] = [None] * len(task_list)
            flagged_row: list[float | None] = [None] * len(task_list)
            names = [t.name for t in task_list]
            for j in strategy.tested_after(index, len(task_list)):
                folder = task_dir / "test" / task_list[j].name
                values, routing_row[j], unknown_row[j] = self._test(strategy, j, task_list[j], folder, names)
                for metric in METRICS:
                    row[metric][j] = values[metric]
                flagged_row[j] = values[GOOD_FLAGGED]
            state["timing"]["test_s"][task.name] = time.perf_counter() - test_start
            state["tasks"].append(task.name)
            for metric in METRICS:
                state["matrix"][metric].append(row[metric])
            state["routing"].append(routing_row)
            state.setdefault("unknown", []).append(unknown_row)
            state.setdefault("good_flagged", []).append(flagged_row)
            self._save(strategy, state)
            self._log_progress(state, index, end, time.perf_counter() - run_start, start)
        return self.finish(strategy, task_list[: len(state["tasks"])], state)

    @staticmethod
    def _log_progress(state: dict[str, Any], index: int, end: int, elapsed: float, start: int) -> None:
        eta = elapsed / (index + 1 - start) * (end - index - 1)

        def mean_so_far(metric: str) -> str:
            values = [v for v in state["matrix"][metric][-1][: index + 1] if v is not None]
            return f"{100 * sum(values) / len(values):.2f}" if values else "n/a"

        routing = [v for v in state["routing"][-1] if v is not None]
        logger.info(
            "[task %d/%d] %s: elapsed %.0fs, ETA %.0fs | mean so far: img AUROC %s, pix AUROC %s, pix AP %s, "
            "routing %s",
            index + 1,
            end,
            state["tasks"][-1],
            elapsed,
            eta,
            mean_so_far("image_AUROC"),
            mean_so_far("pixel_AUROC"),
            mean_so_far("pixel_AUPR"),
            f"{100 * sum(routing) / len(routing):.1f}%" if routing else "n/a",
        )

    def finish(self, strategy: Strategy, tasks: list[Task], state: dict[str, Any]) -> dict[str, Any]:
        """Build and write the results, plots and overlays from the recorded state."""
        names = state["tasks"]
        n = len(names)
        matrix = {metric: [row[:n] for row in rows] for metric, rows in state["matrix"].items()}
        routing = [row[:n] for row in state["routing"]]
        results = {
            "tasks": names,
            "matrix": matrix,
            **summarize(names, matrix, routing),
            "routing_matrix": routing,
            "unknown_product_rate": {
                name: (state.get("unknown") or [[None] * n])[-1][j] for j, name in enumerate(names)
            },
            "good_flagged": {name: (state.get("good_flagged") or [[None] * n])[-1][j] for j, name in enumerate(names)},
            "params": strategy.costs(),
            "timing": state["timing"],
            "config": state["config"],
        }
        if not is_rank_zero():
            return results
        write_results(results, self.output_dir)
        plot_matrix_heatmaps(results, self.output_dir)
        plot_final_bars(results, self.output_dir)
        for index, task in enumerate(tasks if self.overlays_per_task > 0 else []):
            true_task = strategy.true_task(index)
            with strategy.testing(index) as (module, _):
                save_overlays(module, task.datamodule, task.name, self.output_dir, self.overlays_per_task, true_task)
        return results
