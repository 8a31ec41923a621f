"""MoLE-Flow as an anomalib ``AnomalibModule``: continual normalizing-flow anomaly detection.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_moleflow import MoleFlow
    >>> model = MoleFlow()
    >>> for category in ("bottle", "cable"):
    ...     model.add_task(category)
    ...     Engine().fit(model, datamodule=MVTecAD(category=category))  # a new Engine per task
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim
from torchvision.transforms.v2 import Compose, Normalize, Resize

from .loss import MoleFlowLoss
from .post_processor import TaskPostProcessor
from .torch_model import MoleFlowModel

logger = logging.getLogger(__name__)

Routing = Literal["router", "oracle"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class MoleFlow(AnomalibModule):
    """MoLE-Flow: one frozen normalizing flow, a low-rank expert per task, and a router.

    Tasks are added with :meth:`add_task`; each ``fit`` trains the latest task. When ``fit`` runs on a model with no
    task (e.g. ``anomalib train``), a task named after the datamodule's category is added automatically.

    Args:
        backbone: timm backbone (frozen).
        layers: Backbone stages used for the patch embedding.
        pre_trained: Load ImageNet weights into the backbone.
        image_size: Input side length; the pre-processor resizes to it.
        embed_dim: Patch embedding size D (multiple of 4).
        num_coupling_layers: MoLE coupling blocks (0: DIA only).
        dia_blocks: DIA blocks per task (0: MoLE only).
        lora_rank: LoRA rank of the experts.
        use_lora: Low-rank experts; ``False``: per-task full-rank linear.
        use_whitening_adapter: Per-task whitening adapter.
        use_pos_embedding: 2D sinusoidal positional embedding.
        spatial_context_kernel: Shared spatial context kernel (0: off).
        scale_context_kernel: Scale context kernel inside each coupling subnet (0: off).
        tail_weight: Weight of the tail term of the loss.
        tail_top_k_ratio: Fraction of patches in the tail term.
        lambda_logdet: Weight of the log-determinant regulariser.
        score_aggregation_top_k: Image score = mean of the k highest patch scores.
        freeze_base: Freeze the shared base after the first task (``False``: sequential fine-tuning).
        task_separated: A whole flow per task (the parameter-hungry upper bound).
        lr: Adam learning rate.
        max_epochs: Epochs per task (passed to the trainer).
        lora_alpha: LoRA alpha; defaults to ``lora_rank`` (scale 1).
        routing: ``"router"`` (Mahalanobis) or ``"oracle"`` (use :attr:`oracle_task`, for ablations).
        router_eps: Relative ridge of the router covariances.
        pre_processor: anomalib pre-processor, or ``True`` for resize to ``image_size`` + ImageNet normalisation.
        post_processor: Post-processor, or ``True`` for the per-task :class:`TaskPostProcessor`.
        evaluator: Evaluator, or ``True`` for image/pixel AUROC, AUPR and pixel AUPRO.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        image_size: int = 224,
        embed_dim: int = 768,
        num_coupling_layers: int = 6,
        dia_blocks: int = 2,
        lora_rank: int = 64,
        use_lora: bool = True,
        use_whitening_adapter: bool = True,
        use_pos_embedding: bool = True,
        spatial_context_kernel: int = 3,
        scale_context_kernel: int = 5,
        tail_weight: float = 0.7,
        tail_top_k_ratio: float = 0.02,
        lambda_logdet: float = 1e-4,
        score_aggregation_top_k: int = 3,
        freeze_base: bool = True,
        task_separated: bool = False,
        lr: float = 3e-4,
        max_epochs: int = 60,
        lora_alpha: float | None = None,
        routing: Routing = "router",
        router_eps: float = 0.01,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        layers = tuple(layers)
        _check(len(layers) >= 1, "layers must name at least one backbone stage.")
        _check(image_size >= 32, f"image_size must be >= 32, got {image_size}.")
        _check(embed_dim >= 4 and embed_dim % 4 == 0, f"embed_dim must be a positive multiple of 4, got {embed_dim}.")
        _check(num_coupling_layers >= 0, f"num_coupling_layers must be >= 0, got {num_coupling_layers}.")
        _check(dia_blocks >= 0, f"dia_blocks must be >= 0, got {dia_blocks}.")
        _check(num_coupling_layers + dia_blocks > 0, "num_coupling_layers and dia_blocks cannot both be 0.")
        _check(lora_rank >= 1, f"lora_rank must be >= 1, got {lora_rank}.")
        for name, kernel in (
            ("spatial_context_kernel", spatial_context_kernel),
            ("scale_context_kernel", scale_context_kernel),
        ):
            _check(kernel == 0 or (kernel > 0 and kernel % 2 == 1), f"{name} must be 0 (off) or odd, got {kernel}.")
        _check(0.0 <= tail_weight <= 1.0, f"tail_weight must be in [0, 1], got {tail_weight}.")
        _check(0.0 < tail_top_k_ratio <= 1.0, f"tail_top_k_ratio must be in (0, 1], got {tail_top_k_ratio}.")
        _check(lambda_logdet >= 0.0, f"lambda_logdet must be >= 0, got {lambda_logdet}.")
        _check(score_aggregation_top_k >= 1, f"score_aggregation_top_k must be >= 1, got {score_aggregation_top_k}.")
        _check(lr > 0, f"lr must be > 0, got {lr}.")
        _check(max_epochs >= 1, f"max_epochs must be >= 1, got {max_epochs}.")
        _check(routing in {"router", "oracle"}, f"routing must be 'router' or 'oracle', got {routing!r}.")
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model: MoleFlowModel = MoleFlowModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            image_size=image_size,
            embed_dim=embed_dim,
            num_coupling_layers=num_coupling_layers,
            dia_blocks=dia_blocks,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            use_lora=use_lora,
            use_whitening_adapter=use_whitening_adapter,
            use_pos_embedding=use_pos_embedding,
            spatial_context_kernel=spatial_context_kernel,
            scale_context_kernel=scale_context_kernel,
            score_aggregation_top_k=score_aggregation_top_k,
            task_separated=task_separated,
            router_eps=router_eps,
        )
        self.loss = MoleFlowLoss(tail_weight, tail_top_k_ratio, lambda_logdet)
        self.freeze_base = freeze_base
        self.lr = lr
        self.max_epochs = max_epochs
        self.routing: Routing = routing
        #: True task index used for every image when ``routing == "oracle"``.
        self.oracle_task: int | None = None
        #: Task index used for each image of the last evaluated batch (read by the post-processor).
        self.last_task_ids: torch.Tensor | None = None
        self.routing_log: list[torch.Tensor] = []

    # ----------------------------------------------------------- components
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 224) and normalise with ImageNet statistics."""
        image_size = image_size or (224, 224)
        return PreProcessor(
            transform=Compose(
                [
                    Resize(image_size, antialias=True),
                    Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
                ]
            ),
        )

    def configure_post_processor(self) -> PostProcessor:
        """Per-task thresholds and normalisation."""
        return TaskPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """The study's metrics: image AUROC/AUPR and pixel AUROC/AUPR ("pixel AP")/AUPRO."""
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return Evaluator(test_metrics=test_metrics)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping, ``max_epochs`` epochs, no sanity validation."""
        return {"gradient_clip_val": 0, "max_epochs": self.max_epochs, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    # ---------------------------------------------------------------- tasks
    @property
    def task_names(self) -> list[str]:
        """Names of the tasks learned (or being learned), in order."""
        return list(self.model.task_names)

    @property
    def training_task(self) -> int:
        """Index of the task that ``fit`` trains: the latest one."""
        if self.model.num_tasks == 0:
            msg = "MoLE-Flow has no task: call `model.add_task(name)` first."
            raise RuntimeError(msg)
        return self.model.num_tasks - 1

    def add_task(self, name: str) -> int:
        """Add a task (expert, whitening adapter, DIA, router prototype, post-processing row).

        The next ``fit`` trains it; earlier tasks are never modified when ``freeze_base`` is set.

        Returns:
            The task's index.
        """
        index = self.model.add_task(name)
        if isinstance(self.post_processor, TaskPostProcessor):
            self.post_processor.ensure_tasks(self.model.num_tasks)
        logger.info("Added task %d '%s'.", index, name)
        return index

    def task_index(self, name: str) -> int:
        """Index of a task by name."""
        if name not in self.model.task_names:
            msg = f"Unknown task '{name}'. Known tasks: {self.model.task_names}."
            raise KeyError(msg)
        return self.model.task_names.index(name)

    def setup(self, stage: str) -> None:
        """Before fitting a model that has no task (and no checkpoint to restore tasks from), add one.

        The task is named after the datamodule's category, or ``task_0``.
        """
        if stage != "fit" or self.model.num_tasks > 0 or getattr(self.trainer, "ckpt_path", None):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        self.add_task(str(getattr(datamodule, "category", None) or "task_0"))

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam over the training task's own parameters, plus the shared base on the first task or when not frozen.

        Everything else gets ``requires_grad=False`` and stays out of the optimizer, so it cannot change.
        """
        task = self.training_task
        params = self.model.set_trainable(task, train_shared=task == 0 or not self.freeze_base)
        return optim.Adam(params, lr=self.lr)

    # ------------------------------------------------------------- training
    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of the training task: tail-aware NLL + log-det regularisation; feeds the router."""
        del args, kwargs
        task = self.training_task
        nll, log_det, image_embedding = self.model.forward_train(batch.image, task)
        loss = self.loss(nll, log_det)
        if not torch.isfinite(loss):
            msg = (
                f"Non-finite training loss ({loss.item()}) on task {task} '{self.model.task_names[task]}' at epoch "
                f"{self.current_epoch}. Stopped before the optimizer step, so no weight was changed by it and earlier "
                "tasks are untouched. Lower `lr`, use fewer `num_coupling_layers`, or check the images for NaN."
            )
            raise FloatingPointError(msg)
        prototype = self.model.router.prototypes[task]
        if not prototype.ready:
            prototype.accumulate(image_embedding)
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return {"loss": loss}

    def on_train_epoch_end(self) -> None:
        """Fit the training task's router prototype once its first epoch of embeddings is collected."""
        prototype = self.model.router.prototypes[self.training_task]
        if not prototype.ready:
            prototype.finalize()

    # ------------------------------------------------------------ inference
    def _oracle_ids(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Task ids to force (``None``: route): the training task while fitting, the oracle task in oracle mode."""
        trainer = self._trainer
        # Lightning keeps state.fn == FITTING after fit ends: only a running fit forces the training task.
        if (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
        ):
            return torch.full((batch_size,), self.training_task, device=device)
        if self.routing == "oracle":
            if self.oracle_task is None:
                msg = "routing='oracle' needs `model.oracle_task` set to the true task index."
                raise RuntimeError(msg)
            return torch.full((batch_size,), self.oracle_task, device=device)
        return None

    def _predict(self, images: torch.Tensor) -> InferenceBatch:
        predictions, task_ids = self.model.predict(images, self._oracle_ids(images.shape[0], images.device))
        self.last_task_ids = task_ids
        self.routing_log.append(task_ids.detach().cpu())
        return predictions

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score validation images (with the training task's expert during ``fit``)."""
        del args, kwargs
        return batch.update(**self._predict(batch.image)._asdict())

    def test_step(self, batch: Batch, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score test images, each routed to its task."""
        del batch_idx, args, kwargs
        return batch.update(**self._predict(batch.image)._asdict())

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        """Score images, each routed to its task."""
        del batch_idx, dataloader_idx
        return batch.update(**self._predict(batch.image)._asdict())

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> InferenceBatch:
        """Pre-process, score with routing, and post-process each image with its task's statistics."""
        del args, kwargs
        images = self.pre_processor(batch) if self.pre_processor else batch
        predictions, task_ids = self.model.predict(images, self._oracle_ids(images.shape[0], images.device))
        self.last_task_ids = task_ids
        if isinstance(self.post_processor, TaskPostProcessor):
            return self.post_processor(predictions, task_ids=task_ids)
        return self.post_processor(predictions) if self.post_processor else predictions

    def reset_routing_log(self) -> None:
        """Forget the task ids recorded by previous evaluations."""
        self.routing_log = []

    def routed_tasks(self) -> torch.Tensor:
        """Task index used for every image evaluated since the last :meth:`reset_routing_log`."""
        return torch.cat(self.routing_log) if self.routing_log else torch.zeros(0, dtype=torch.long)
