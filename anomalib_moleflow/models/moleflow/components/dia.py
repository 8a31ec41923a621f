"""DIA: the per-task deep invertible adapter, a small flow of affine coupling blocks after the MoLE blocks."""

from __future__ import annotations

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import GLOWCouplingBlock
from torch import nn

#: Soft clamp of DIA scales: s = alpha * tanh(s_raw / alpha).
DIA_CLAMP = 2.0


class SoftClamp:
    """``u -> tanh(u / alpha)``; FrEIA multiplies by its ``clamp`` (= alpha), giving ``alpha * tanh(u / alpha)``.

    A class rather than a lambda so the module stays picklable.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Apply the clamp."""
        return torch.tanh(u / self.alpha)


def _zero_last_mlp(c_in: int, c_out: int) -> nn.Sequential:
    """MLP subnet with hidden width ``D/2`` (``c_in`` is D/2) whose last layer is zero, so the block is identity."""
    mlp = nn.Sequential(nn.Linear(c_in, c_in), nn.ReLU(), nn.Linear(c_in, c_out))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class DeepInvertibleAdapter(nn.Module):
    """A task-owned mini-flow of ``num_blocks`` GLOW affine coupling blocks that starts as the identity.

    Args:
        dim: Channels D.
        num_blocks: Number of coupling blocks.
        clamp: Soft-clamp alpha of the scales.
    """

    def __init__(self, dim: int, num_blocks: int, clamp: float = DIA_CLAMP) -> None:
        super().__init__()
        self.blocks = SequenceINN(dim)
        for _ in range(num_blocks):
            self.blocks.append(
                GLOWCouplingBlock,
                subnet_constructor=_zero_last_mlp,
                clamp=clamp,
                clamp_activation=SoftClamp(clamp),
            )

    def forward(self, tokens: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform ``(n, d)`` tokens; returns them and the per-token log-determinant ``(n,)``."""
        return self.blocks(tokens, rev=rev)
