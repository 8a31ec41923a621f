"""Strategies: what a method does at each step of the continual protocol that :class:`ContinualEngine` runs.

The protocol ("learn task i, then test tasks 0..i, record, save") is written once, in the engine. A strategy says how
a method learns a task, which module (and routing log) scores a tested task, and how it saves and restores itself:

* :class:`MoleFlowStrategy`: MoLE-Flow (frozen base, sequential fine-tuning or task-separated: the model's flags);
* :class:`FinetuneStrategy`: one anomalib model trained task after task (forgets);
* :class:`SeparateStrategy`: one anomalib model per task, MoLE-Flow's router picks the model for each image;
* :class:`JointStrategy`: one anomalib model on all tasks at once (not continual: an upper bound), tested at the end.

Thresholds and normalisation of the baselines: anomalib's ``PostProcessor`` keeps a single set of statistics, fitted
on the validation images of the last ``fit``. AUROC/AUPR/AUPRO depend only on the ranking of the scores within the
tested task, but the set is not irrelevant: anomalib's min-max normalisation clips to [0, 1], and torchmetrics
treats scores outside [0, 1] as logits, so scores of an old task normalised with the latest task's range saturate
into ties. So, like MoLE-Flow's per-task post-processor, every task is scored with statistics of its own:
single-model strategies (finetune, joint) re-fit the post-processor on the tested task's validation images right
before testing it (``calibrate``); in ``separate``, each model keeps the statistics of its own task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib.data import AnomalibDataModule
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor

from anomalib_moleflow.baselines import RoutedExperts, TaskRouter, TimmPatchcore, non_backbone_size
from anomalib_moleflow.checkpoint import read_checkpoint
from anomalib_moleflow.data import Task, joint_datamodule
from anomalib_moleflow.models import MoleFlow
from anomalib_moleflow.models.moleflow.components.feature_cache import is_random
from anomalib_moleflow.models.moleflow.components.router import RoutingLog

from .trainer import TaskTrainer

Routing = Literal["router", "oracle"]
ModelFactory = Callable[[], AnomalibModule]


class Strategy(ABC):
    """One method's side of the continual protocol.

    Attributes:
        calibrate: Re-fit the module's post-processor on a task's validation images before testing that task.
    """

    calibrate: bool = False

    @abstractmethod
    def learn(self, index: int, task: Task, trainer: TaskTrainer, folder: Path) -> None:
        """Learn task ``index`` (its training data only) with ``trainer``, writing under ``folder``."""

    def tested_after(self, index: int, num_tasks: int) -> range:
        """Indices of the tasks tested after learning task ``index`` (default: every task seen so far)."""
        del num_tasks
        return range(index + 1)

    @abstractmethod
    @contextmanager
    def testing(self, index: int) -> Iterator[tuple[AnomalibModule, RoutingLog | None]]:
        """The module that scores task ``index``'s test images, and the log of its routing (``None``: no routing)."""

    def stale_statistics(self, index: int) -> AnomalibModule | None:
        """The module to validate on task ``index`` before any test, when its statistics for that task were fitted
        with other scoring settings than it scores with now (default: ``None``, nothing to refit)."""
        del index
        return None

    def true_task(self, index: int) -> int | None:
        """The task to score task ``index``'s test images with instead of routing (oracle mode); ``None``: routed."""
        del index
        return None

    @abstractmethod
    def learned(self) -> list[str]:
        """Names of the tasks learned so far (a strategy may start with tasks learned earlier)."""

    @abstractmethod
    def save(self, path: Path, trainer: TaskTrainer) -> None:
        """Write everything learned so far to ``path`` (the engine makes the write atomic)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what :meth:`save` wrote."""

    @abstractmethod
    def costs(self) -> dict[str, Any]:
        """``{"per_task": [{task, params, bytes}], ...}``: what each task added."""

    @abstractmethod
    def final_module(self) -> torch.nn.Module:
        """The module that serves every task at the end (for inference timing)."""

    def describe(self) -> dict[str, Any]:
        """Settings to record in the results."""
        return {"strategy": type(self).__name__}

    def session(self, tasks: Sequence[Task], folder: Path) -> AbstractContextManager[None]:
        """Context of a whole run over ``tasks`` writing into ``folder`` (default: nothing; MoLE-Flow caches test
        features in it)."""
        del tasks, folder
        return nullcontext()


def check_finite(model: AnomalibModule, task: str) -> None:
    """Fail when training left non-finite weights or buffers in the network (e.g. a diverged flow).

    Only the torch model is checked: the post-processor's statistics are NaN by design when normalisation is off.

    Raises:
        FloatingPointError: If a parameter or buffer holds NaN or infinity.
    """
    for name, tensor in [*model.model.named_parameters(), *model.model.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all():
            msg = f"Non-finite values in '{name}' after training task '{task}' (training diverged)."
            raise FloatingPointError(msg)


# ---------------------------------------------------------------------------------------------------- MoLE-Flow
class MoleFlowStrategy(Strategy):
    """MoLE-Flow: one model, a new expert per task; images routed by the model's router (or the true task).

    Args:
        model: The model; it may already hold tasks (e.g. loaded from a checkpoint), which are never retrained.
        routing: ``"router"`` (the model picks each image's task) or ``"oracle"`` (the true task, for ablations).
    """

    def __init__(self, model: MoleFlow, routing: Routing = "router") -> None:
        if routing not in {"router", "oracle"}:
            msg = f"routing must be 'router' or 'oracle', got {routing!r}."
            raise ValueError(msg)
        self.model = model
        self.routing = routing

    def learn(self, index: int, task: Task, trainer: TaskTrainer, folder: Path) -> None:
        """Add the task's expert and train it (skipped when the model already holds the task)."""
        del index
        if task.name in self.model.task_names:
            return
        new = self.model.add_task(task.name)
        with self.model.fitting(new):
            trainer.fit(self.model, task.datamodule, folder)

    @contextmanager
    def testing(self, index: int) -> Iterator[tuple[AnomalibModule, RoutingLog | None]]:
        """The model itself, recording its routing (the oracle's task, if any, comes with the data: ``true_task``)."""
        del index
        with self.model.record_routing() as log:
            yield self.model, log

    def stale_statistics(self, index: int) -> AnomalibModule | None:
        """The model, when task ``index``'s thresholds and normalisation were fitted with other scoring settings (it
        was loaded with new ones): validating it on the task's data fits them again.

        Raises:
            ValueError: If validation cannot fit them: they came from held-out good training images, or the model
                sets its thresholds that way (``threshold="good_fpr"``) and skips validation.
        """
        stale = self.model.stale_statistics()
        if index not in stale:
            return None
        if not self.model.refits_by_validation(index):
            self.model.refuse_stale_statistics(torch.tensor([index]))  # says why, and what to do
        return self.model

    def true_task(self, index: int) -> int | None:
        """``index`` in oracle mode (the true task), else ``None`` (the model's router picks)."""
        return index if self.routing == "oracle" else None

    def learned(self) -> list[str]:
        """The model's tasks."""
        return self.model.task_names

    def save(self, path: Path, trainer: TaskTrainer) -> None:
        """A Lightning checkpoint (``MoleFlow.load_from_checkpoint`` reads it), through the last Engine's trainer."""
        if trainer.last_engine is None:
            msg = "Nothing ran the model yet: there is no trainer to save its checkpoint with."
            raise RuntimeError(msg)
        trainer.last_engine.trainer.save_checkpoint(path)

    def load(self, path: Path) -> None:
        """Load the checkpoint's weights and tasks into the model (its settings must match: checked on load)."""
        self.model.load_state_dict(read_checkpoint(path)["state_dict"])

    def costs(self) -> dict[str, Any]:
        """The model's parameter report (backbone, shared, per task)."""
        return self.model.model.parameter_report()

    def session(self, tasks: Sequence[Task], folder: Path) -> AbstractContextManager[None]:
        """Each test image's patch embedding computed once for the whole run (the model's test feature cache, its
        file, if on disk, in ``folder``); no cache when a test set has random transforms."""
        capacity = 0
        for task in tasks:
            task.datamodule.setup()
            if is_random(getattr(task.datamodule.test_data, "augmentations", None)):
                return nullcontext()
            capacity += len(task.datamodule.test_data)
        return self.model.test_feature_cache(capacity, folder)

    def final_module(self) -> torch.nn.Module:
        """The model."""
        return self.model

    def describe(self) -> dict[str, Any]:
        """Strategy, routing, the model's settings, and apart from them the settings that change only speed."""
        model = {key: value for key, value in dict(self.model.hparams).items() if not key.startswith("_")}
        model.update(self.model.model.settings)  # resolved values (embed_dim=None -> the D actually used)
        speed = {key: model.pop(key) for key in MoleFlow.SPEED_SETTINGS if key in model}
        return {"strategy": "moleflow", "routing": self.routing, "model": model, "speed": speed}


# ---------------------------------------------------------------------------------------------------- baselines
class _BaselineStrategy(Strategy):
    """Shared parts of the anomalib baselines: a model factory, pickled saves, learned task names."""

    def __init__(self, make: ModelFactory, name: str) -> None:
        self.make = make
        self.name = name
        self._learned: list[str] = []

    def learned(self) -> list[str]:
        """Names of the tasks learned so far."""
        return list(self._learned)

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The objects to pickle (besides the learned task names)."""

    @abstractmethod
    def _restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`_state` gave."""

    def save(self, path: Path, trainer: TaskTrainer) -> None:
        """Pickle the models (anomalib's baselines have no per-task checkpoint format to reuse)."""
        del trainer
        torch.save({"learned": self._learned, **self._state()}, path)

    def load(self, path: Path) -> None:
        """Restore the pickled models."""
        state = read_checkpoint(path)
        self._learned = list(state.pop("learned"))
        self._restore(state)

    def describe(self) -> dict[str, Any]:
        """Strategy name and the baseline's class."""
        return {"strategy": type(self).__name__, "model": self.name}


class _SingleModelStrategy(_BaselineStrategy):
    """One model serves every task (no routing); its post-processing is re-fitted on each tested task."""

    calibrate = True

    def __init__(self, make: ModelFactory, name: str) -> None:
        super().__init__(make, name)
        self.model = make()

    @contextmanager
    def testing(self, index: int) -> Iterator[tuple[AnomalibModule, RoutingLog | None]]:
        """The one model (no routing)."""
        del index
        yield self.model, None

    def _state(self) -> dict[str, Any]:
        return {"model": self.model}

    def _restore(self, state: dict[str, Any]) -> None:
        self.model = state["model"]

    def final_module(self) -> torch.nn.Module:
        """The one model."""
        return self.model


class FinetuneStrategy(_SingleModelStrategy):
    """One model trained task after task (each ``fit`` on the new task's data only), tested on every seen task."""

    def learn(self, index: int, task: Task, trainer: TaskTrainer, folder: Path) -> None:
        """Train the one model on the task (Patchcore's memory bank is rebuilt from the new task's data)."""
        del index
        if isinstance(self.model, TimmPatchcore):
            self.model.reset_memory_bank()
        trainer.fit(self.model, task.datamodule, folder)
        check_finite(self.model, task.name)
        self._learned.append(task.name)

    def costs(self) -> dict[str, Any]:
        """Nothing is added per task: one model, overwritten."""
        return {"per_task": [{"task": name, "params": 0, "bytes": 0} for name in self._learned]}


class SeparateStrategy(_BaselineStrategy):
    """One model per task; MoLE-Flow's Mahalanobis router picks the model that scores each test image.

    Args:
        make: Builds a fresh baseline model.
        name: The baseline's name.
        router_kwargs: :class:`TaskRouter` settings (MoLE-Flow's backbone, stages, embedding size, ridge).
        device: Device of the router's prototype fitting.
    """

    def __init__(
        self,
        make: ModelFactory,
        name: str,
        router_kwargs: dict[str, Any],
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(make, name)
        self.device = torch.device(device)
        self.router = TaskRouter(**router_kwargs)
        self.experts: list[AnomalibModule] = []
        self.per_task: list[dict[str, Any]] = []

    def learn(self, index: int, task: Task, trainer: TaskTrainer, folder: Path) -> None:
        """Train a fresh model on the task, then add the task's router prototype from its training images."""
        expert = self.make()
        trainer.fit(expert, task.datamodule, folder)
        check_finite(expert, task.name)
        self.router.to(self.device).add_task(_train_batches(task.datamodule, expert.pre_processor, self.device))
        self.experts.append(expert.cpu())
        params, size = _expert_size(expert)
        _, router_bytes = self.router.prototype_size(index)
        self.per_task.append({"task": task.name, "params": params, "bytes": size + router_bytes})
        self._learned.append(task.name)

    def _ensemble(self) -> RoutedExperts:
        transform = self.experts[0].pre_processor.transform
        return RoutedExperts.build(self.router, self.experts, PreProcessor(transform=transform))

    @contextmanager
    def testing(self, index: int) -> Iterator[tuple[AnomalibModule, RoutingLog | None]]:
        """The router and every model so far, recording which model scored each image."""
        del index
        ensemble = self._ensemble()
        with ensemble.model.record_routing() as log:
            yield ensemble, log

    def _state(self) -> dict[str, Any]:
        return {"router": self.router.cpu(), "experts": self.experts, "per_task": self.per_task}

    def _restore(self, state: dict[str, Any]) -> None:
        self.router, self.experts, self.per_task = state["router"], state["experts"], state["per_task"]

    def costs(self) -> dict[str, Any]:
        """Each task's whole model without the frozen backbone (Patchcore: its memory bank) plus its prototype."""
        return {"per_task": list(self.per_task)}

    def final_module(self) -> torch.nn.Module:
        """The router and every model."""
        return self._ensemble()


class JointStrategy(_SingleModelStrategy):
    """One model on every task's training data at once (not continual), trained and tested after the last task.

    Args:
        make: Builds the baseline model.
        name: The baseline's name.
        tasks: The whole task sequence (the joint training set).
    """

    def __init__(self, make: ModelFactory, name: str, tasks: Sequence[Task]) -> None:
        super().__init__(make, name)
        self.tasks = list(tasks)

    def learn(self, index: int, task: Task, trainer: TaskTrainer, folder: Path) -> None:
        """Nothing until the last task; then train on all tasks' data together."""
        self._learned.append(task.name)
        if index == len(self.tasks) - 1:
            trainer.fit(self.model, joint_datamodule(self.tasks), folder)
            check_finite(self.model, "joint")

    def tested_after(self, index: int, num_tasks: int) -> range:
        """Every task, once, after the last one."""
        return range(num_tasks) if index == num_tasks - 1 else range(0)

    def costs(self) -> dict[str, Any]:
        """Patchcore: an equal share of the joint memory bank per task; Fastflow: nothing added per task."""
        n = len(self.tasks)
        if isinstance(self.model, TimmPatchcore):
            params, size = self.model.memory_bank_size()
            return {"per_task": [{"task": t.name, "params": params / n, "bytes": size / n} for t in self.tasks]}
        return {"per_task": [{"task": t.name, "params": 0, "bytes": 0} for t in self.tasks]}


def _train_batches(
    datamodule: AnomalibDataModule,
    pre_processor: PreProcessor,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    """Pre-processed training images of a (set-up) datamodule, batch by batch."""
    for batch in datamodule.train_dataloader():
        yield pre_processor.transform(batch.image.to(device))


def _expert_size(expert: AnomalibModule) -> tuple[int, int]:
    """What one task's model adds: Patchcore's memory bank, or the whole model minus the frozen backbone."""
    if isinstance(expert, TimmPatchcore):
        return expert.memory_bank_size()
    return non_backbone_size(expert.model, expert.backbone_module())
