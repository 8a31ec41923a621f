"""The Lightning callbacks every MoLE-Flow fit runs (returned by :meth:`MoleFlow.configure_callbacks`).

* :class:`FitScope`: a fit started without ``MoleFlow.fitting`` (a plain ``Engine.fit``, ``anomalib train``) trains
  the newest task (on a model without tasks, a new one named after the data): the scope is entered at setup and
  left when the fit ends or fails.
* :class:`TrainingFeatureCache`: the training feature cache's life cycle (decide at the start of the fit whether the
  transforms allow one, open it, close it when the fit ends or fails).
* :class:`TaskStatisticsFitting`: after each training epoch, fit what the training task's first epoch collected, the
  router prototype and (``whitening_norm="position"``) the whitening statistics.
* :class:`TaskWeightAveraging` (``average_last > 0``): the task ends with the mean of its weights over the last part
  of its training steps.
* :class:`TaskScoreCalibration`: before the fit's validation (or at its end), fit the training task's per-position
  score statistics with the weights it ends with.

The training step itself only reads the cache and feeds the statistics; when they are fitted is decided here.

One callback a caller adds itself: :class:`OracleRouting` (the study's oracle mode) gives every tested or predicted
batch its images' true task, which the model then scores with instead of routing.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from anomalib.data import Folder
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_moleflow.distributed import gather_objects

from .components.feature_cache import FeatureCache, random_transform

if TYPE_CHECKING:
    from .settings import CacheDtype, CacheMode

logger = logging.getLogger(__name__)


class FitScope(Callback):
    """Enter ``pl_module.fitting()`` (the newest task) for a fit whose caller chose no task; leave it afterwards.

    This is the adapter for callers that cannot call ``add_task`` or ``fitting`` (``anomalib train``, a plain
    ``Engine.fit``): a model without tasks (and no checkpoint to restore them from) gets one, named after the
    datamodule's category, else a ``Folder``'s ``name``, else ``task_0``.
    """

    def __init__(self) -> None:
        self._scope = ExitStack()

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Choose the newest task unless the caller chose one (adding the first one if there is none)."""
        if stage != "fit" or pl_module.is_fitting:
            return
        if pl_module.model.num_tasks == 0 and not getattr(trainer, "ckpt_path", None):
            pl_module.add_task(task_name(getattr(trainer, "datamodule", None)))
        self._scope.enter_context(pl_module.fitting())

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Leave the scope when the fit ends."""
        del trainer, pl_module, stage
        self._scope.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Leave the scope when the fit fails (Lightning calls no ``teardown`` then)."""
        del trainer, pl_module, exception
        self._scope.close()


#: The batch attribute that carries each image's true task ``(b,)`` (set by :class:`OracleRouting`).
TRUE_TASK = "true_task"


def true_tasks(batch: object) -> torch.Tensor | None:
    """Each image's true task ``(b,)`` if the batch carries them (:class:`OracleRouting`), else ``None`` (routed)."""
    return getattr(batch, TRUE_TASK, None)


class OracleRouting(Callback):
    """The study's oracle mode: every validated, tested or predicted batch carries ``task`` as its images' true task,
    and MoLE-Flow scores them with that task's expert, statistics and thresholds instead of routing.

    The task travels with the data, as the ground-truth labels do (``Engine(callbacks=[OracleRouting(j)]).test(...)``);
    the model itself keeps no routing state.

    Args:
        task: Index of the task every image of the run belongs to.
    """

    def __init__(self, task: int) -> None:
        self.task = task

    def _label(self, batch: Any, pl_module: Any) -> None:
        """Put the true task into the batch (checked per batch: a checkpoint's tasks are restored after ``setup``).

        Raises:
            IndexError: If ``task`` is not one of the model's tasks.
        """
        if not 0 <= self.task < pl_module.model.num_tasks:
            msg = f"Oracle task {self.task} does not exist: the model has {pl_module.model.num_tasks} task(s)."
            raise IndexError(msg)
        images = batch.image
        setattr(batch, TRUE_TASK, torch.full((images.shape[0],), self.task, dtype=torch.long, device=images.device))

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Label the batch with the true task."""
        del trainer, batch_idx, dataloader_idx
        self._label(batch, pl_module)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Label the batch with the true task."""
        del trainer, batch_idx, dataloader_idx
        self._label(batch, pl_module)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Label the batch with the true task."""
        del trainer, batch_idx, dataloader_idx
        self._label(batch, pl_module)


def task_name(datamodule: object) -> str:
    """A task's name from its data: the datamodule's category, else a ``Folder``'s ``name``, else ``task_0``."""
    name = str(getattr(datamodule, "category", "") or "")
    if not name and isinstance(datamodule, Folder):
        name = str(datamodule.name or "")
    return name or "task_0"


class TrainingFeatureCache(Callback):
    """Each training image's patch embedding computed once per fit and reused by the later epochs.

    Bypassed (with a log line) when the training data has no image paths or a transform is random (or not known to be
    deterministic).

    Args:
        mode: ``auto``, ``memory``, ``disk`` or ``off`` (see :class:`FeatureCache`).
        dtype: Storage type of the cache.
    """

    def __init__(self, mode: CacheMode, dtype: CacheDtype) -> None:
        self.mode = mode
        self.dtype = dtype
        self.cache: FeatureCache | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the cache when the training transforms are deterministic."""
        self.close()
        if self.mode == "off":
            return
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "samples"):
            reason = "the training data has no image paths"
        elif unsafe := random_transform(getattr(dataset, "augmentations", None)) or random_transform(
            getattr(pl_module.pre_processor, "transform", None)
        ):
            reason = f"the training transform {unsafe} is random or not known to be deterministic"
        else:
            self.cache = FeatureCache(len(dataset), self.mode, self.dtype, trainer.default_root_dir)
            return
        logger.info("No training feature cache: %s.", reason)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Free the cache."""
        del trainer, pl_module
        self.close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Free the cache when a fit stops early."""
        del trainer, pl_module, stage
        self.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Free the cache when a fit fails (Lightning calls no ``teardown`` then)."""
        del trainer, pl_module, exception
        self.close()

    def close(self) -> None:
        """Close and drop the cache (a memory-mapped file is deleted)."""
        if self.cache is not None:
            self.cache.close()
        self.cache = None


class TaskStatisticsFitting(Callback):
    """At the end of each training epoch, fit the training task's router prototype and whitening statistics once
    their first epoch is collected (later epochs find them fitted and change nothing)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Fit what the epoch collected for ``pl_module.training_task`` (under DDP: what every rank collected)."""
        del trainer
        task = pl_module.training_task
        model = pl_module.model
        if model.whitening_needs_fit(task):
            for path in model.paths:
                path.whitening[task].share(gather_objects)
            model.finalize_whitening(task)
        if not model.router.prototypes[task].ready:
            model.router.prototypes[task].share(gather_objects)
            model.router.finalize(task)


class TaskWeightAveraging(Callback):
    """End the fit with the equal-weight mean of the trained parameters over the last ``share`` of its steps (SWA).

    Adam at a constant rate leaves the last iterate wherever its last steps took it; the mean of the iterates over
    the end of training is a flatter, less seed-dependent point (docs/quality.md 0h). Only the parameters the
    optimizer trains are averaged, so every earlier task's expert (and a frozen base) stays bit-identical. The mean
    is installed after the last training batch, before the validation that fits the task's thresholds.

    Lightning's ``WeightAveraging`` is not used: it copies the whole module when the fit sets up (the backbone, every
    expert, the feature statistics), pairs parameters and buffers with that copy by position, and copies every buffer
    back at the end, which would overwrite the router and whitening statistics fitted during the fit.

    Args:
        share: Fraction of the fit's training progress (in epochs, after any statistics epoch) at the end whose
            iterates are averaged; in ``(0, 1]``.
    """

    def __init__(self, share: float) -> None:
        self.share = share
        self._mean: list[torch.Tensor] = []
        self._count = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forget any earlier fit's mean."""
        del trainer, pl_module
        self._mean, self._count = [], 0

    @staticmethod
    def _trained(trainer: Trainer) -> list[torch.Tensor]:
        return [p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]]

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Add this step's weights to the mean once the averaged share is reached; install the mean after the last."""
        del batch
        if not trainer.max_epochs or trainer.max_epochs < 1:  # a fit bounded by steps or time: no known end
            return
        first = pl_module.statistics_epochs
        epochs = trainer.max_epochs - first
        done = trainer.current_epoch - first + (batch_idx + 1) / max(1, trainer.num_training_batches)
        if outputs is not None and done > (1 - self.share) * epochs:  # ``None``: a batch that stepped nothing
            params = self._trained(trainer)
            self._count += 1
            if not self._mean:
                self._mean = [p.detach().clone() for p in params]
            else:
                with torch.no_grad():
                    for mean, p in zip(self._mean, params, strict=True):
                        mean.lerp_(p.detach(), 1 / self._count)
        if self._mean and trainer.current_epoch == trainer.max_epochs - 1 and trainer.is_last_batch:
            with torch.no_grad():
                for p, mean in zip(self._trained(trainer), self._mean, strict=True):
                    p.copy_(mean)
            self._mean, self._count = [], 0


class TaskScoreCalibration(Callback):
    """Fit the training task's per-position score statistics (``MoleFlow.fit_score_calibration``) from its training
    images once its weights are final: before the fit's validation, which sets the task's thresholds from its scores,
    and at the end of the fit if a step came after (a fit without validation, e.g. ``threshold="good_fpr"``, whose
    thresholds ``on_train_end`` sets from held-out images after this callback's ``on_train_end``). Every task keeps
    its statistics; ``score_calibration`` only decides whether scoring uses them.
    """

    def __init__(self) -> None:
        self._stale = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A fit always ends with statistics of its own weights."""
        del trainer, pl_module
        self._stale = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A step changed the weights (``None``: a batch that stepped nothing)."""
        del trainer, pl_module, batch, batch_idx
        self._stale = self._stale or outputs is not None

    def _fit(self, trainer: Trainer, pl_module: Any) -> None:
        if self._stale and pl_module.is_fitting:
            pl_module.fit_score_calibration(pl_module.training_task, trainer.train_dataloader)
            self._stale = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before a validation inside the fit."""
        if trainer.state.fn == TrainerFn.FITTING:
            self._fit(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At the end of the fit, if the weights changed since the last fit of the statistics."""
        self._fit(trainer, pl_module)


def training_cache(pl_module: LightningModule) -> FeatureCache | None:
    """The open training feature cache of ``pl_module``'s running fit (``None``: no cache, or no trainer)."""
    try:
        callbacks = pl_module.trainer.callbacks
    except RuntimeError:  # Lightning's answer when no trainer is attached (a direct call of training_step)
        return None
    for callback in callbacks:
        if isinstance(callback, TrainingFeatureCache):
            return callback.cache
    return None
