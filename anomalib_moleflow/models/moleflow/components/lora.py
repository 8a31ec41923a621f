"""Shared base linear layers with one low-rank (or full-rank) expert per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn


@dataclass
class FlowState:
    """Mutable routing state shared by every task-aware layer of one flow.

    The flow sets it before each pass: ``grid`` (patch grid ``(h, w)``, needed by the convolutions inside coupling
    subnets that see tokens as ``(b h w) c``), and either ``task`` (one expert key for the whole batch: training) or
    ``image_tasks`` (an expert index per image ``(b,)``: a routed batch that mixes tasks).
    """

    task: str | None = None
    grid: tuple[int, int] = (1, 1)
    image_tasks: torch.Tensor | None = None


class LoRAExpert(nn.Module):
    """Low-rank update ``(alpha / r) * B @ A``: A Xavier-initialised, B zero so a new expert starts as a no-op."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.xavier_uniform_(self.lora_a)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the expert's additive output for ``(n, in)`` inputs."""
        return F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


class FullRankExpert(nn.Module):
    """Full-rank per-task update ``dW @ x + db`` (the ``use_lora=False`` ablation), zero at start."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the expert's additive output for ``(n, in)`` inputs."""
        return F.linear(x, self.weight, self.bias)


class MoLELinear(nn.Module):
    """``W x + b + expert_t(x)``: a shared base Linear plus the expert of the task in ``state.task``.

    Args:
        in_features: Input size.
        out_features: Output size.
        state: Shared routing state.
        rank: LoRA rank r.
        alpha: LoRA scale alpha (the update is multiplied by alpha / r).
        use_lora: Low-rank experts; ``False`` gives full-rank per-task experts.
        zero_init: Initialise the base weights to zero (used for last layers that must start at identity).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        state: FlowState,
        rank: int,
        alpha: float,
        use_lora: bool = True,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        if zero_init:
            nn.init.zeros_(self.base.weight)
            nn.init.zeros_(self.base.bias)
        self.experts = nn.ModuleDict()
        self.state = state
        self.rank = rank
        self.alpha = alpha
        self.use_lora = use_lora

    def add_expert(self, task: str) -> None:
        """Create the expert of ``task``, which starts as a no-op."""
        in_features, out_features = self.base.in_features, self.base.out_features
        self.experts[task] = (
            LoRAExpert(in_features, out_features, self.rank, self.alpha)
            if self.use_lora
            else FullRankExpert(in_features, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply base and the current task's expert (or each image's expert) to ``(n, in)`` inputs."""
        out = self.base(x)
        if self.state.image_tasks is not None:
            return out + self._per_image_expert(x, self.state.image_tasks)
        if self.state.task is not None and self.state.task in self.experts:
            out = out + self.experts[self.state.task](x)
        return out

    def _per_image_expert(self, x: torch.Tensor, image_tasks: torch.Tensor) -> torch.Tensor:
        """Expert output for ``((b n), in)`` tokens, image ``i`` through expert ``image_tasks[i]``.

        The experts' weights are stacked and gathered per image, so one batched matmul serves a batch that mixes
        tasks: the cost is one expert's, whatever the number of tasks, and the graph has no data-dependent branch
        (it exports to ONNX as is).
        """
        experts = [self.experts[str(task)] for task in range(len(self.experts))]  # keys are the task indices
        tokens = rearrange(x, "(b n) i -> b n i", b=image_tasks.shape[0])
        if self.use_lora:
            lora_a = torch.stack([e.lora_a for e in experts])[image_tasks]  # (b, r, in)
            lora_b = torch.stack([e.lora_b for e in experts])[image_tasks]  # (b, out, r)
            hidden = torch.einsum("bni,bri->bnr", tokens, lora_a)
            update = torch.einsum("bnr,bor->bno", hidden, lora_b) * experts[0].scaling
        else:
            weight = torch.stack([e.weight for e in experts])[image_tasks]  # (b, out, in)
            bias = torch.stack([e.bias for e in experts])[image_tasks]  # (b, out)
            update = torch.einsum("bni,boi->bno", tokens, weight) + bias[:, None]
        return rearrange(update, "b n o -> (b n) o")


__all__ = ["FlowState", "FullRankExpert", "LoRAExpert", "MoLELinear"]
