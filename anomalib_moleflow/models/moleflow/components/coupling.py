"""MoLE coupling blocks: FrEIA ``AllInOneBlock``s whose subnets use shared-base + per-task-expert linears."""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from .adapters import SpatialContext
from .lora import FlowState, MoLELinear


def _global_scale_softplus(a: torch.Tensor, softplus: nn.Softplus) -> torch.Tensor:
    """FrEIA ``AllInOneBlock``'s default (``SOFTPLUS``) global affine activation: ``0.1 * softplus(a)``."""
    return 0.1 * softplus(a)


#: Scale clamp of the affine couplings (AllInOneBlock: s = clamp * tanh(0.1 * a)).
AFFINE_CLAMP = 2.0


class MoLESubnet(nn.Module):
    """Coupling subnet ``a = MoLELinear(ReLU(MoLELinear(x1)))`` with an optional scale-context branch.

    The scale context is a depthwise k x k convolution of the conditioning half on the patch grid, zero-initialised
    and scaled by ``0.2 * sigmoid(theta)``; it is added to the scale (``s``) half of the output only.

    Args:
        in_features: Size of the conditioning half.
        out_features: ``2 *`` size of the transformed half (``s`` then ``t``).
        hidden_features: Hidden width.
        state: Shared routing state (task and grid).
        rank: LoRA rank.
        alpha: LoRA alpha.
        use_lora: Low-rank experts (``False``: full-rank per-task experts).
        scale_context_kernel: Kernel of the scale context convolution, 0 for none.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int,
        state: FlowState,
        rank: int,
        alpha: float,
        use_lora: bool,
        scale_context_kernel: int,
    ) -> None:
        super().__init__()
        self.state = state
        self.fc1 = MoLELinear(in_features, hidden_features, state, rank, alpha, use_lora)
        self.act = nn.ReLU()
        self.fc2 = MoLELinear(hidden_features, out_features, state, rank, alpha, use_lora)
        self.scale_channels = out_features // 2
        self.scale_conv: nn.Conv2d | None = None
        if scale_context_kernel > 0:
            if in_features != self.scale_channels:
                msg = "Scale context needs equal coupling halves: use an even embed_dim."
                raise ValueError(msg)
            self.scale_conv = nn.Conv2d(
                in_features,
                in_features,
                scale_context_kernel,
                padding=scale_context_kernel // 2,
                groups=in_features,
            )
            nn.init.zeros_(self.scale_conv.weight)
            nn.init.zeros_(self.scale_conv.bias)
            self.scale_theta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``((b h w), c_in)`` tokens to ``((b h w), 2 * c_half)`` coupling coefficients."""
        out = self.fc2(self.act(self.fc1(x)))
        if self.scale_conv is None:
            return out
        height, width = self.state.grid
        grid = rearrange(x, "(b h w) c -> b c h w", h=height, w=width)
        context = rearrange(self.scale_conv(grid), "b c h w -> (b h w) c") * (0.2 * torch.sigmoid(self.scale_theta))
        return torch.cat([out[:, : self.scale_channels] + context, out[:, self.scale_channels :]], dim=1)


class MoLEFlow(nn.Module):
    """The shared part of the flow: gated spatial context, then ``num_blocks`` MoLE coupling blocks.

    Args:
        dim: Channels D (even).
        num_blocks: Number of coupling blocks (0 allowed: DIA-only models).
        spatial_context_kernel: Kernel of the spatial context, 0 for none.
        scale_context_kernel: Kernel of each subnet's scale context, 0 for none.
        rank: LoRA rank.
        alpha: LoRA alpha.
        use_lora: Low-rank experts.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        spatial_context_kernel: int,
        scale_context_kernel: int,
        rank: int,
        alpha: float,
        use_lora: bool,
    ) -> None:
        super().__init__()
        self.state = FlowState()
        self.spatial_context = SpatialContext(dim, spatial_context_kernel) if spatial_context_kernel > 0 else None
        hidden = dim

        def subnet(c_in: int, c_out: int) -> MoLESubnet:
            return MoLESubnet(c_in, c_out, hidden, self.state, rank, alpha, use_lora, scale_context_kernel)

        self.blocks = SequenceINN(dim)
        for _ in range(num_blocks):
            self.blocks.append(AllInOneBlock, subnet_constructor=subnet, affine_clamping=AFFINE_CLAMP)
            block = self.blocks.module_list[-1]
            # FrEIA sets this activation to a lambda, which cannot be pickled; anomalib's TORCH export pickles the
            # whole model. Same function, as a picklable partial of a module-level one.
            block.global_scale_activation = partial(_global_scale_softplus, softplus=block.softplus)

    def moles(self) -> list[MoLELinear]:
        """Every task-aware linear of the flow."""
        return [module for module in self.modules() if isinstance(module, MoLELinear)]

    def add_expert(self, task: str) -> None:
        """Add the (no-op) expert of ``task`` to every coupling subnet."""
        for layer in self.moles():
            layer.add_expert(task)

    def expert_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters of the experts of ``task``."""
        return [p for layer in self.moles() if task in layer.experts for p in layer.experts[task].parameters()]

    def base_parameters(self) -> list[nn.Parameter]:
        """Shared parameters: everything but the experts (permutations are fixed and never trained)."""
        expert_ids = {id(p) for layer in self.moles() for p in layer.experts.parameters()}
        return [p for name, p in self.named_parameters() if id(p) not in expert_ids and "w_perm" not in name]

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the spatial context to ``(b, h, w, d)`` features."""
        return x if self.spatial_context is None else self.spatial_context(x)

    def forward(
        self,
        tokens: torch.Tensor,
        task: str | torch.Tensor,
        grid: tuple[int, int],
        rev: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the coupling blocks on ``((b h w), d)`` tokens with the experts of ``task``.

        Args:
            tokens: Input tokens.
            task: Expert key for the whole batch, or an expert index per image ``(b,)`` (a routed batch).
            grid: Patch grid ``(h, w)``.
            rev: Run the inverse.

        Returns:
            Output tokens and the per-token log-determinant ``((b h w),)``.
        """
        if len(self.blocks.module_list) == 0:
            return tokens, tokens.new_zeros(tokens.shape[0])
        # FrEIA calls subnets with the conditioning half only, so the task and grid reach them through the flow's
        # shared state, set for the duration of this pass.
        if isinstance(task, torch.Tensor):
            self.state.image_tasks = task
        else:
            self.state.task = task
        self.state.grid = grid
        try:
            return self.blocks(tokens, rev=rev)
        finally:
            self.state.task, self.state.image_tasks = None, None
