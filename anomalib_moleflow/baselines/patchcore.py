"""anomalib's Patchcore with backbone weights from the same place as MoLE-Flow's (offline ones included)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib import PrecisionType
from anomalib.metrics import Evaluator
from anomalib.models import Patchcore
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_moleflow.compat import reset_memory_bank
from anomalib_moleflow.models.moleflow.components.backbone import build_feature_extractor

from .common import BenchmarkBaseline


class TimmPatchcore(BenchmarkBaseline, Patchcore):
    """anomalib's ``Patchcore``; its backbone is built by :func:`build_feature_extractor`.

    anomalib's ``PatchcoreModel`` loads ImageNet weights through timm's hub download only. Here the extractor is built
    first by MoLE-Flow's :func:`build_feature_extractor` (offline weights for ``tf_efficientnet_lite*``, a clear error
    when the hub is unreachable), anomalib's model is built with a random backbone, and the two are swapped. Memory
    bank, coreset sampling, scoring and anomaly maps are anomalib's.

    Args:
        backbone: timm model name.
        layers: Backbone stages whose features fill the memory bank.
        pre_trained: ImageNet weights.
        image_size: Input side length; the pre-processor resizes to it.
        coreset_sampling_ratio: Fraction of patch features kept in the memory bank.
        num_neighbors: Nearest neighbours used to re-weight the image score.
        precision: ``"float32"`` or ``"float16"`` (memory bank and backbone).
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
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        precision: str = "float32",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if not 0.0 < coreset_sampling_ratio <= 1.0:
            msg = f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio}."
            raise ValueError(msg)
        extractor = build_feature_extractor(backbone, layers, pre_trained)  # fails early on a bad backbone/layer
        dtype = torch.float16 if PrecisionType(precision.lower()) == PrecisionType.FLOAT16 else torch.float32
        self._init_on_extractor(
            extractor.to(dtype),
            image_size,
            pre_processor,
            backbone=backbone,
            layers=tuple(layers),
            coreset_sampling_ratio=coreset_sampling_ratio,
            num_neighbors=num_neighbors,
            precision=precision,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )

    def memory_bank_size(self) -> tuple[int, int]:
        """Elements and bytes of the memory bank."""
        bank = self.model.memory_bank
        return bank.numel(), bank.numel() * bank.element_size()

    def reset_memory_bank(self) -> None:
        """Let the next ``fit`` build a new memory bank from its own data (replacing the current one).

        anomalib fits the memory bank only once: a second ``fit`` on another task would silently keep the first
        task's bank. Resetting makes a later ``fit`` behave like a fresh training run.
        """
        reset_memory_bank(self)
