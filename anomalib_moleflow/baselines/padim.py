"""anomalib's Padim with backbone weights from the same place as MoLE-Flow's (offline ones included)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.metrics import Evaluator
from anomalib.models import Padim
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_moleflow.compat import padim_default_features
from anomalib_moleflow.models.moleflow.components.backbone import build_feature_extractor

from .common import BenchmarkBaseline


class TimmPadim(BenchmarkBaseline, Padim):
    """anomalib's ``Padim``; its backbone is built by :func:`build_feature_extractor` (like :class:`TimmPatchcore`).

    Embedding, random channel selection, per-position Gaussians, Mahalanobis maps and scores are anomalib's.

    Args:
        backbone: timm model name.
        layers: Backbone stages whose features form the embedding.
        pre_trained: ImageNet weights.
        image_size: Input side length; the pre-processor resizes to it.
        n_features: Channels kept by Padim's random selection; ``None``: anomalib's default for the backbone (at
            most the stages' channels), or every channel for backbones anomalib has no default for.
        pre_processor: Pre-processor, or ``True`` for resize to ``image_size`` + ImageNet normalisation.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for :func:`~anomalib_moleflow.metrics.default_evaluator`.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        image_size: int = 224,
        n_features: int | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        extractor = build_feature_extractor(backbone, layers, pre_trained)  # fails early on a bad backbone/layer
        if n_features is None:
            channels = sum(extractor.out_dims)
            n_features = min(padim_default_features(backbone) or channels, channels)
        self._init_on_extractor(
            extractor,
            image_size,
            pre_processor,
            backbone=backbone,
            layers=list(layers),
            n_features=n_features,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )

    def fit(self) -> None:
        """anomalib's Gaussian fit, with one CPU thread.

        torch 2.14's batched ``torch.linalg.inv`` on CPU fails with more than one MKL thread ("Pivots given to
        lu_solve must all be greater or equal to 1"), and Padim inverts one covariance per patch position.
        """
        previous = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            super().fit()
        finally:
            torch.set_num_threads(previous)
