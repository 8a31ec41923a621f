"""Size accounting shared by the baselines."""

from __future__ import annotations

from collections.abc import Iterable

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

    def backbone_module(self) -> nn.Module:
        """The frozen feature extractor (shared by every task, not a per-task cost)."""
        return self.model.feature_extractor
