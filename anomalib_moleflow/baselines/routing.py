"""One model per task, and MoLE-Flow's Mahalanobis router choosing which one scores each image.

The router is built from MoLE-Flow's own components (:func:`build_feature_extractor`, :class:`PatchEmbedding`,
:class:`MahalanobisRouter`) with the same settings, so a "separate" baseline routes exactly like MoLE-Flow does and
its routing accuracy is measured, not assumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_moleflow.metrics import default_evaluator
from anomalib_moleflow.models.moleflow.components.backbone import build_feature_extractor
from anomalib_moleflow.models.moleflow.components.embedding import PatchEmbedding, default_embed_dim
from anomalib_moleflow.models.moleflow.components.router import MahalanobisRouter, RoutingLog, RoutingRecorder
from anomalib_moleflow.models.moleflow.settings import RouterCovariance, RouterEmbedding

from .common import tensor_size


class TaskRouter(nn.Module):
    """MoLE-Flow's router on its own: image embedding (pooled patch embedding) -> nearest task.

    Args:
        backbone: timm backbone (frozen).
        layers: Backbone stages of the patch embedding.
        pre_trained: ImageNet weights.
        embed_dim: Patch embedding size D; ``None``: MoLE-Flow's default for the backbone.
        patch_size: Local averaging window of the patch embedding (as MoLE-Flow's).
        eps: Relative ridge of each task's own covariance.
        embedding: Image embedding, as MoLE-Flow's ``router_embedding``.
        covariance: Covariance of the route, as MoLE-Flow's ``router_covariance``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        embed_dim: int | None = None,
        patch_size: int = 1,
        eps: float = 0.01,
        embedding: RouterEmbedding = "quadrant_max",
        covariance: RouterCovariance = "pooled",
    ) -> None:
        super().__init__()
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained)
        embed_dim = embed_dim or default_embed_dim(sum(self.feature_extractor.out_dims))
        self.patch_embedding = PatchEmbedding(embed_dim, patch_size)
        self.router = MahalanobisRouter(embed_dim, eps, embedding, covariance)

    @property
    def num_tasks(self) -> int:
        """Number of tasks with a prototype."""
        return len(self.router.prototypes)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(b, d)`` of pre-processed images (as MoLE-Flow's ``MoleFlowModel.embed``)."""
        features = list(self.feature_extractor(images).values())
        return self.router.embed(self.patch_embedding(features))

    @torch.no_grad()
    def add_task(self, batches: Iterable[torch.Tensor]) -> int:
        """Add a task's prototype from its pre-processed training images; returns its index."""
        self.feature_extractor.eval()
        self.router.add_task()
        self.router.to(next(self.feature_extractor.parameters()).device)
        prototype = self.router.prototypes[-1]
        for images in batches:
            prototype.accumulate(self.embed(images))
        self.router.finalize(self.num_tasks - 1)
        return self.num_tasks - 1

    def prototype_size(self, task: int) -> tuple[int, int]:
        """Elements and bytes of one task's prototype (mean, precision, count)."""
        return tensor_size(self.router.prototypes[task].state_dict().values())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Task index ``(b,)`` of each pre-processed image."""
        self.feature_extractor.eval()
        return self.router(self.embed(images))


class RoutedModels(nn.Module):
    """Route each image, score it with its task's model, and normalise it with that model's post-processor.

    Each model's post-processor holds the statistics of its own task, so scores of images sent to different models
    are comparable (like MoLE-Flow's per-task post-processing).

    Args:
        router: A fitted :class:`TaskRouter`.
        experts: One trained anomalib model per task, in task order.
    """

    def __init__(self, router: TaskRouter, experts: Sequence[AnomalibModule]) -> None:
        super().__init__()
        if router.num_tasks != len(experts):
            msg = f"The router knows {router.num_tasks} tasks but {len(experts)} models were given."
            raise ValueError(msg)
        self.router = router
        self.experts = nn.ModuleList(experts)
        self._routing = RoutingRecorder()

    def record_routing(self) -> AbstractContextManager[RoutingLog]:
        """Inside the ``with`` block, record the model (task) that scored each image."""
        return self._routing.record()

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Routed, per-task normalised predictions of pre-processed images."""
        task_ids = self.router(images)
        self._routing.append(task_ids)
        pred_score: torch.Tensor | None = None
        anomaly_map: torch.Tensor | None = None
        for task in task_ids.unique().tolist():
            selected = task_ids == task
            expert = self.experts[task]
            predictions = expert.model(images[selected])
            if expert.post_processor is not None:
                predictions = expert.post_processor(predictions)
            scores = predictions.pred_score.reshape(-1).float()
            maps = predictions.anomaly_map.float()
            if pred_score is None:
                pred_score = scores.new_zeros(images.shape[0])
                anomaly_map = maps.new_zeros((images.shape[0], *maps.shape[1:]))
            pred_score[selected] = scores
            anomaly_map[selected] = maps  # type: ignore[index]
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


class RoutedExperts(AnomalibModule):
    """Test-only anomalib module: :class:`RoutedModels` evaluated by anomalib's engine and metrics.

    Build it with :meth:`build`. Scores are already normalised per task by each model's post-processor, so this
    module has no post-processor of its own.

    Args:
        pre_processor: The models' (common) pre-processor.
        evaluator: Evaluator, or ``True`` for the benchmark's metrics.
    """

    def __init__(self, pre_processor: nn.Module | bool = True, evaluator: Evaluator | bool = True) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=False, evaluator=evaluator, visualizer=False)
        self.model: RoutedModels

    @classmethod
    def build(
        cls,
        router: TaskRouter,
        experts: Sequence[AnomalibModule],
        pre_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
    ) -> RoutedExperts:
        """Combine a fitted router and one trained model per task (the models are kept, not copied)."""
        module = cls(pre_processor=pre_processor, evaluator=evaluator)
        module.model = RoutedModels(router, experts)
        return module

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """The benchmark's metrics."""
        return default_evaluator()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Nothing to train."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: each model was trained on normal images only."""
        return LearningType.ONE_CLASS

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """The models are trained one by one before being combined; this module is for testing only."""
        del batch, args, kwargs
        msg = "RoutedExperts is test-only: train each task's model on its own, then combine them."
        raise RuntimeError(msg)
