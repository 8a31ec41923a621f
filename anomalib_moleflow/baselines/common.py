"""What the baselines share: size accounting, MoLE-Flow's metrics and backbone."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from anomalib.metrics import Evaluator
from torch import nn

from anomalib_moleflow.metrics import default_evaluator


def tensor_size(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Number of elements and bytes of ``tensors`` (each tensor counted once)."""
    unique = {id(t): t for t in tensors}.values()
    return sum(t.numel() for t in unique), sum(t.numel() * t.element_size() for t in unique)


def non_backbone_size(model: nn.Module, backbone: nn.Module) -> tuple[int, int]:
    """Parameters (count) and parameters + buffers (bytes) of ``model`` outside its frozen ``backbone``.

    The frozen pretrained backbone is the same for every task (and every method), so it is not a per-task cost.
    """
    skip = {id(t) for t in (*backbone.parameters(), *backbone.buffers())}
    params = [p for p in model.parameters() if id(p) not in skip]
    buffers = [b for b in model.buffers() if id(b) not in skip]
    count, _ = tensor_size(params)
    _, size = tensor_size(params + buffers)
    return count, size


class BenchmarkBaseline:
    """What every anomalib baseline of the benchmark shares: MoLE-Flow's metrics and access to its frozen backbone.

    Put it first in the bases (``class TimmPadim(BenchmarkBaseline, Padim)``) so that its methods win.
    """

    model: nn.Module

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """The benchmark's metrics (MoLE-Flow's)."""
        return default_evaluator()

    def _init_on_extractor(
        self, extractor: nn.Module, image_size: int, pre_processor: nn.Module | bool, **settings: Any
    ) -> None:
        """Run the anomalib model's own ``__init__`` (the next class in the bases) with ``settings`` but without its
        backbone weights (``pre_trained=False``), then put ``extractor`` (MoLE-Flow's, offline weights included) in
        place of anomalib's feature extractor. ``pre_processor=True``: resize to ``image_size`` + ImageNet
        normalisation."""
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))  # type: ignore[attr-defined]
        super().__init__(pre_trained=False, pre_processor=pre_processor, **settings)  # type: ignore[call-arg]
        self.model.feature_extractor = extractor

    def backbone_module(self) -> nn.Module:
        """The frozen feature extractor (shared by every task, not a per-task cost)."""
        return self.model.feature_extractor
