"""DIA: the per-task deep invertible adapter, a small flow of affine coupling blocks after the MoLE blocks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from einops import rearrange
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


class PerImageMLP(nn.Module):
    """The same coupling subnet of every task's DIA, image ``i`` through the subnet of task ``image_tasks[i]``.

    The tasks' weights are stacked and gathered per image: one batched matmul whatever the number of tasks, and no
    data-dependent branch (exportable). It holds the tasks' own subnets, so it adds no parameters.

    Args:
        subnets: Subnet ``(Linear, ReLU, Linear)`` of each task, in task order.
        image_tasks: Task index per image ``(b,)``.
    """

    def __init__(self, subnets: Sequence[nn.Sequential], image_tasks: torch.Tensor) -> None:
        super().__init__()
        self.subnets = nn.ModuleList(subnets)
        self.image_tasks = image_tasks

    def _stacked(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.stack([subnet[index].weight for subnet in self.subnets])[self.image_tasks]
        bias = torch.stack([subnet[index].bias for subnet in self.subnets])[self.image_tasks]
        return weight, bias[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``((b n), c_in)`` tokens to ``((b n), c_out)``."""
        tokens = rearrange(x, "(b n) c -> b n c", b=self.image_tasks.shape[0])
        weight, bias = self._stacked(0)
        hidden = torch.relu(torch.einsum("bnc,bhc->bnh", tokens, weight) + bias)
        weight, bias = self._stacked(2)
        return rearrange(torch.einsum("bnh,boh->bno", hidden, weight) + bias, "b n o -> (b n) o")


def per_image_dia(adapters: Sequence[DeepInvertibleAdapter], image_tasks: torch.Tensor) -> SequenceINN:
    """One DIA that sends image ``i`` through the DIA of task ``image_tasks[i]`` (a routed batch that mixes tasks).

    The coupling blocks are FrEIA's, rebuilt around :class:`PerImageMLP` subnets that share the tasks' weights.
    """
    first = adapters[0].blocks
    flow = SequenceINN(*first.shapes[0])
    for index, block in enumerate(first.module_list):
        per_task = [adapter.blocks.module_list[index] for adapter in adapters]
        subnets: Iterator[PerImageMLP] = iter(
            PerImageMLP([getattr(b, name) for b in per_task], image_tasks) for name in ("subnet1", "subnet2")
        )
        flow.append(
            GLOWCouplingBlock,
            subnet_constructor=lambda *_: next(subnets),  # noqa: B023  (called twice, right here)
            clamp=block.clamp,
            clamp_activation=block.f_clamp,
        )
    return flow
