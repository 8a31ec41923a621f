"""Shared base linear layers with one low-rank (or full-rank) expert per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn


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
    """``W x + b + expert_t(x)``: a shared base Linear plus, for each image, the expert of its task.

    The task of every image is an argument of :meth:`forward`; an index without an expert raises.

    Args:
        in_features: Input size.
        out_features: Output size.
        rank: LoRA rank r.
        alpha: LoRA scale alpha (the update is multiplied by alpha / r).
        use_lora: Low-rank experts; ``False`` gives full-rank per-task experts.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, use_lora: bool = True) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.experts = nn.ModuleDict()
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

    def expert(self, task: int) -> nn.Module:
        """The expert of task index ``task``.

        Raises:
            KeyError: If the task has no expert here.
        """
        if str(task) not in self.experts:
            msg = f"No expert for task {task}: this layer has experts for tasks {list(self.experts)}."
            raise KeyError(msg)
        return self.experts[str(task)]

    def forward(self, x: torch.Tensor, image_tasks: torch.Tensor) -> torch.Tensor:
        """``((b n), in)`` tokens of ``b`` images, image ``i`` through the expert of task ``image_tasks[i]``."""
        out = self.base(x)
        if not torch.compiler.is_exporting():
            present = image_tasks.unique()
            if present.numel() == 1:  # one task for the whole batch (training; a routed batch of one product)
                return out + self.expert(int(present))(x)
            for task in (present[0], present[-1]):  # sorted: the smallest and largest index must have experts
                self.expert(int(task))
        # Several tasks (or an exported graph, which cannot branch on them): each image's weights gathered.
        return out + self._per_image_expert(x, image_tasks)

    def _per_image_expert(self, x: torch.Tensor, image_tasks: torch.Tensor) -> torch.Tensor:
        """Expert output for ``((b n), in)`` tokens, image ``i`` through expert ``image_tasks[i]``.

        The experts' weights are stacked and gathered per image, so one batched matmul serves a batch that mixes
        tasks: the cost is one expert's, whatever the number of tasks, and the graph has no data-dependent branch
        (it exports to ONNX as is).
        """
        experts = [self.expert(task) for task in range(len(self.experts))]  # keys are the task indices
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


__all__ = ["FullRankExpert", "LoRAExpert", "MoLELinear"]
