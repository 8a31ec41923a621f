"""How each row trains and tests: MoLE-Flow through the continual engine, the baselines in three regimes.

Every row learns the same tasks in the same order and is tested with anomalib's engine and the same metrics. After
each task, every task seen so far is tested (except ``joint``, which trains once on everything), so the task x task
matrix, forgetting and routing accuracy come out of :func:`anomalib_moleflow.continual.summarize` for every row.

Thresholds and normalisation of the baselines: anomalib's ``PostProcessor`` keeps a single set of statistics,
fitted on the validation images of the last ``fit``. AUROC/AUPR/AUPRO depend only on the ranking of the scores within
the tested task, but the set is not irrelevant: anomalib's min-max normalisation clips to [0, 1], and torchmetrics
treats scores outside [0, 1] as logits (sigmoid), so raw scores, or scores of an old task normalised with the latest
task's range, saturate into ties (a Patchcore tested on raw scores gets exactly 0.5). So, like MoLE-Flow's per-task
post-processor, every task is scored with statistics of its own: single-model rows (``finetune``, ``joint``)
re-fit the post-processor on the tested task's validation images (``Engine.validate``, anomalib's protocol: the
validation set is the test set) right before testing it; in ``separate``, each model keeps the statistics of its own
task, so images routed to different models get comparable scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import seed_everything

from anomalib_moleflow.baselines import RoutedExperts, TaskRouter, TimmFastflow, TimmPatchcore, non_backbone_size
from anomalib_moleflow.continual import METRICS, ContinualEngine, Task
from anomalib_moleflow.continual.engine import task_engine
from anomalib_moleflow.continual.results import _clean
from anomalib_moleflow.models import MoleFlow

from .config import RowSpec

Matrix = dict[str, list[list[float | None]]]


@dataclass
class RowContext:
    """Everything a row needs besides its own settings.

    Attributes:
        tasks: The task sequence.
        folder: The row's output folder.
        seed: Base seed; task ``i`` trains under ``seed + i`` (as in the continual engine).
        accelerator: Lightning accelerator.
        devices: Lightning devices.
        progress_bar: Lightning progress bars.
        device: Device used for inference timing and the router.
    """

    tasks: list[Task]
    folder: Path
    seed: int
    accelerator: str
    devices: int | str
    progress_bar: bool
    device: torch.device


@dataclass
class RowOutcome:
    """What a row produced.

    Attributes:
        matrix: ``matrix[metric][i][j]``: metric on task j after learning task i.
        routing: ``routing[i][j]``: routing accuracy on task j after task i (``None`` without routing).
        fit_s: Training seconds per task (``"joint"`` for the joint row).
        per_task: Parameters and bytes added per task, ``[{task, params, bytes}]``.
        module: The final model, used for inference timing.
        notes: Extra facts for the JSON output.
    """

    matrix: Matrix
    routing: list[list[float | None]]
    fit_s: dict[str, float]
    per_task: list[dict[str, Any]]
    module: torch.nn.Module
    notes: dict[str, Any] = field(default_factory=dict)


def empty_matrix(n: int) -> Matrix:
    """A matrix of ``None``."""
    return {metric: [[None] * n for _ in range(n)] for metric in METRICS}


def no_routing(n: int) -> list[list[float | None]]:
    """Routing matrix of a row that does not route."""
    return [[None] * n for _ in range(n)]


def _engine(ctx: RowContext, folder: Path) -> Engine:
    # Rows keep their models in memory only.
    return task_engine(folder, ctx.accelerator, ctx.devices, ctx.progress_bar, enable_model_summary=False)


def fit_task(ctx: RowContext, model: AnomalibModule, datamodule: AnomalibDataModule, folder: Path) -> float:
    """Train with a fresh anomalib ``Engine`` (a second ``fit`` on one Engine does nothing); returns seconds."""
    start = time.perf_counter()
    _engine(ctx, folder).fit(model, datamodule=datamodule)
    return time.perf_counter() - start


def evaluate(
    ctx: RowContext,
    model: AnomalibModule,
    datamodule: AnomalibDataModule,
    folder: Path,
    calibrate: bool = False,
) -> dict[str, Any]:
    """Test with a fresh ``Engine``; returns the benchmark metrics (``None`` where undefined).

    With ``calibrate``, the model's post-processor statistics are first re-fitted on this task's validation images.
    """
    engine = _engine(ctx, folder)
    if calibrate:
        engine.validate(model, datamodule=datamodule, verbose=False)
    output = engine.test(model, datamodule=datamodule, verbose=False)
    metrics = output[0] if output else {}
    return {metric: _clean(metrics.get(metric)) for metric in METRICS}


def check_finite(model: AnomalibModule, task: str) -> None:
    """Fail the row when training left non-finite weights or buffers in the network (e.g. a diverged flow).

    Only the torch model is checked: the post-processor's statistics are NaN by design when normalisation is off.

    Raises:
        FloatingPointError: If a parameter or buffer holds NaN or infinity.
    """
    for name, tensor in [*model.model.named_parameters(), *model.model.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all():
            msg = f"Non-finite values in '{name}' after training task '{task}' (training diverged)."
            raise FloatingPointError(msg)


def _store(matrix: Matrix, i: int, j: int, values: dict[str, Any]) -> None:
    for metric in METRICS:
        matrix[metric][i][j] = values[metric]


def _train_batches(
    datamodule: AnomalibDataModule, pre_processor: PreProcessor, device: torch.device
) -> Iterator[torch.Tensor]:
    """Pre-processed training images of a (set-up) datamodule, batch by batch."""
    for batch in datamodule.train_dataloader():
        yield pre_processor.transform(batch.image.to(device))


ModelFactory = Callable[..., AnomalibModule]


def model_factory(row: RowSpec, kwargs: dict[str, Any]) -> ModelFactory:
    """Constructor of the row's baseline with its settings (anomalib's default post-processor)."""
    cls = {"fastflow": TimmFastflow, "patchcore": TimmPatchcore}[row.model]

    def make(**extra: Any) -> AnomalibModule:
        return cls(**kwargs, visualizer=False, **extra)

    return make


def run_moleflow(ctx: RowContext, kwargs: dict[str, Any]) -> RowOutcome:
    """MoLE-Flow (frozen base after the first task) through :class:`ContinualEngine`."""
    seed_everything(ctx.seed, verbose=False)
    model = MoleFlow(**kwargs, visualizer=False)
    engine = ContinualEngine(
        output_dir=ctx.folder,
        seed=ctx.seed,
        routing="router",
        accelerator=ctx.accelerator,
        devices=ctx.devices,
        enable_progress_bar=ctx.progress_bar,
        overlays_per_task=0,
        config={"benchmark": {"row": "moleflow"}},
    )
    results = engine.run(model, [(task.name, task.datamodule) for task in ctx.tasks])
    return RowOutcome(
        matrix=results["matrix"],
        routing=results["routing_matrix"],
        fit_s=dict(results["timing"]["fit_s"]),
        per_task=results["params"]["per_task"],
        module=model,
        notes={"params": results["params"]},
    )


def run_finetune(ctx: RowContext, make: ModelFactory) -> RowOutcome:
    """One model trained task after task (new Engine each time), tested on every task seen so far."""
    n = len(ctx.tasks)
    matrix, fit_s = empty_matrix(n), {}
    seed_everything(ctx.seed, workers=True, verbose=False)
    model = make()
    for i, task in enumerate(ctx.tasks):
        task_dir = ctx.folder / "tasks" / f"{i:02d}_{task.name}"
        seed_everything(ctx.seed + i, workers=True, verbose=False)
        if isinstance(model, TimmPatchcore):
            model.reset_memory_bank()  # a new fit replaces the bank, as retraining anomalib's Patchcore would
        fit_s[task.name] = fit_task(ctx, model, task.datamodule, task_dir)
        check_finite(model, task.name)
        for j in range(i + 1):
            folder = task_dir / "test" / ctx.tasks[j].name
            _store(matrix, i, j, evaluate(ctx, model, ctx.tasks[j].datamodule, folder, calibrate=True))
    # One model is overwritten task after task: nothing is added per task.
    per_task = [{"task": task.name, "params": 0, "bytes": 0} for task in ctx.tasks]
    return RowOutcome(matrix, no_routing(n), fit_s, per_task, model)


def _expert_size(expert: AnomalibModule) -> tuple[int, int]:
    """What one task's model adds: Patchcore's memory bank, or Fastflow's whole model minus the frozen backbone."""
    if isinstance(expert, TimmPatchcore):
        return expert.memory_bank_size()
    return non_backbone_size(expert.model, expert.backbone_module())


def run_separate(ctx: RowContext, make: ModelFactory, router_kwargs: dict[str, Any]) -> RowOutcome:
    """One model per task; MoLE-Flow's Mahalanobis router picks the model that scores each test image."""
    n = len(ctx.tasks)
    matrix, routing, fit_s = empty_matrix(n), no_routing(n), {}
    router = TaskRouter(**router_kwargs).to(ctx.device)
    experts: list[AnomalibModule] = []
    per_task: list[dict[str, Any]] = []
    ensemble: RoutedExperts | None = None
    for i, task in enumerate(ctx.tasks):
        task_dir = ctx.folder / "tasks" / f"{i:02d}_{task.name}"
        seed_everything(ctx.seed + i, workers=True, verbose=False)
        expert = make()  # keeps its own task's statistics (see the module docstring)
        seconds = fit_task(ctx, expert, task.datamodule, task_dir)
        check_finite(expert, task.name)
        start = time.perf_counter()
        router.to(ctx.device).add_task(_train_batches(task.datamodule, expert.pre_processor, ctx.device))
        fit_s[task.name] = seconds + time.perf_counter() - start
        experts.append(expert.cpu())
        params, size = _expert_size(expert)
        _, router_bytes = router.prototype_size(i)
        per_task.append({"task": task.name, "params": params, "bytes": size + router_bytes})
        ensemble = RoutedExperts.build(router, experts, PreProcessor(transform=expert.pre_processor.transform))
        for j in range(i + 1):
            ensemble.model.reset_routing_log()
            folder = task_dir / "test" / ctx.tasks[j].name
            _store(matrix, i, j, evaluate(ctx, ensemble, ctx.tasks[j].datamodule, folder))
            routed = ensemble.model.routed_tasks()
            routing[i][j] = _clean(float((routed == j).float().mean())) if routed.numel() else None
    if ensemble is None:
        msg = "No task to learn."
        raise ValueError(msg)
    return RowOutcome(matrix, routing, fit_s, per_task, ensemble)


def run_joint(ctx: RowContext, make: ModelFactory, joint: AnomalibDataModule) -> RowOutcome:
    """One model on every task's training data at once (not continual), then tested on each task."""
    n = len(ctx.tasks)
    matrix = empty_matrix(n)
    seed_everything(ctx.seed, workers=True, verbose=False)
    model = make()
    fit_s = {"joint": fit_task(ctx, model, joint, ctx.folder / "joint")}
    check_finite(model, "joint")
    for j, task in enumerate(ctx.tasks):
        _store(matrix, n - 1, j, evaluate(ctx, model, task.datamodule, ctx.folder / "test" / task.name, calibrate=True))
    if isinstance(model, TimmPatchcore):
        # The bank is built from all tasks' data: each task accounts for an equal share of it.
        params, size = model.memory_bank_size()
        per_task = [{"task": task.name, "params": params / n, "bytes": size / n} for task in ctx.tasks]
    else:
        per_task = [{"task": task.name, "params": 0, "bytes": 0} for task in ctx.tasks]
    return RowOutcome(matrix, no_routing(n), fit_s, per_task, model)


def task_names(tasks: Sequence[Task]) -> list[str]:
    """Names of the tasks."""
    return [task.name for task in tasks]
