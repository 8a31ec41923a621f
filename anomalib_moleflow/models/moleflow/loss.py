"""Tail-aware negative log-likelihood with log-determinant regularisation."""

from __future__ import annotations

import math

import torch
from torch import nn


class MoleFlowLoss(nn.Module):
    """``L = (1 - w) mean(NLL) + w mean(top-k NLL of each image) + lambda mean(logdet_patch^2)``.

    ``k = max(1, floor(tail_top_k_ratio * H * W))``.

    Args:
        tail_weight: w, the weight of the tail (hardest patches) term.
        tail_top_k_ratio: Fraction of each image's patches in the tail.
        lambda_logdet: lambda, the weight of the squared per-patch log-determinant.

    Raises:
        ValueError: If a weight or the ratio is out of range.
    """

    def __init__(self, tail_weight: float = 0.7, tail_top_k_ratio: float = 0.02, lambda_logdet: float = 1e-4) -> None:
        super().__init__()
        if not 0.0 <= tail_weight <= 1.0:
            msg = f"tail_weight must be in [0, 1], got {tail_weight}."
            raise ValueError(msg)
        if not 0.0 < tail_top_k_ratio <= 1.0:
            msg = f"tail_top_k_ratio must be in (0, 1], got {tail_top_k_ratio}."
            raise ValueError(msg)
        if lambda_logdet < 0.0:
            msg = f"lambda_logdet must be >= 0, got {lambda_logdet}."
            raise ValueError(msg)
        self.tail_weight = tail_weight
        self.tail_top_k_ratio = tail_top_k_ratio
        self.lambda_logdet = lambda_logdet

    def forward(self, nll: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            nll: Patch negative log-likelihoods ``(b, n)``.
            log_det: Patch log-determinants ``(b, n)``.

        Returns:
            Scalar loss.
        """
        k = max(1, math.floor(self.tail_top_k_ratio * nll.shape[1]))
        tail = nll.topk(k, dim=1).values.mean()
        loss = (1.0 - self.tail_weight) * nll.mean() + self.tail_weight * tail
        if self.lambda_logdet > 0:
            loss = loss + self.lambda_logdet * log_det.pow(2).mean()
        return loss
