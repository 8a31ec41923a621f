"""MoLE coupling blocks: FrEIA ``AllInOneBlock``s whose subnets use shared-base + per-task-expert linears."""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange, repeat
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from .adapters import SpatialContext
from .embedding import sinusoidal_position_embedding
from .lora import MoLELinear


def _global_scale_softplus(a: torch.Tensor, softplus: nn.Softplus) -> torch.Tensor:
    """FrEIA ``AllInOneBlock``'s default (``SOFTPLUS``) global affine activation: ``0.1 * softplus(a)``."""
    return 0.1 * softplus(a)


#: Scale clamp of the affine couplings (AllInOneBlock: s = clamp * tanh(0.1 * a)).
AFFINE_CLAMP = 2.0


class MoLESubnet(nn.Module):
    """Coupling subnet ``a = MoLELinear(ReLU(MoLELinear([x1, p])))`` with an optional scale-context branch.

    FrEIA calls a coupling subnet with its conditioning half concatenated with the block's condition; here the
    condition is ``[p, t]``: the positional code ``p`` (``position_dims`` channels, possibly none) and, in the last
    column, the task index of every token, which picks each image's experts. The scale context is a depthwise k x k
    convolution of the conditioning half on the (fixed) patch grid, zero-initialised and scaled by
    ``0.2 * sigmoid(theta)``; it is added to the scale (``s``) half of the output only.

    Args:
        in_features: Size of the conditioning half plus the condition (``half + position_dims + 1``).
        out_features: ``2 *`` size of the transformed half (``s`` then ``t``).
        hidden_features: Hidden width.
        grid: The patch grid ``(h, w)`` (tokens arrive as ``(b h w)``).
        position_dims: Channels of the positional code in the condition.
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
        grid: tuple[int, int],
        position_dims: int,
        rank: int,
        alpha: float,
        use_lora: bool,
        scale_context_kernel: int,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.half = in_features - position_dims - 1
        self.fc1 = MoLELinear(self.half + position_dims, hidden_features, rank, alpha, use_lora)
        self.act = nn.ReLU()
        self.fc2 = MoLELinear(hidden_features, out_features, rank, alpha, use_lora)
        self.scale_channels = out_features // 2
        self.scale_conv: nn.Conv2d | None = None
        if scale_context_kernel > 0:
            if self.half != self.scale_channels:
                msg = "Scale context needs equal coupling halves: use an even embed_dim."
                raise ValueError(msg)
            self.scale_conv = nn.Conv2d(
                self.half,
                self.half,
                scale_context_kernel,
                padding=scale_context_kernel // 2,
                groups=self.half,
            )
            nn.init.zeros_(self.scale_conv.weight)
            nn.init.zeros_(self.scale_conv.bias)
            self.scale_theta = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``((b h w), half + position_dims + 1)`` tokens and condition to ``((b h w), 2 * c_half)``."""
        height, width = self.grid
        features, image_tasks = inputs[:, :-1], inputs[:, -1]
        image_tasks = rearrange(image_tasks, "(b n) -> b n", n=height * width)[:, 0].round().long()
        out = self.fc2(self.act(self.fc1(features, image_tasks)), image_tasks)
        if self.scale_conv is None:
            return out
        grid = rearrange(features[:, : self.half], "(b h w) c -> b c h w", h=height, w=width)
        context = rearrange(self.scale_conv(grid), "b c h w -> (b h w) c") * (0.2 * torch.sigmoid(self.scale_theta))
        return torch.cat([out[:, : self.scale_channels] + context, out[:, self.scale_channels :]], dim=1)


class MoLEFlow(nn.Module):
    """The shared part of the flow: gated spatial context, then ``num_blocks`` MoLE coupling blocks.

    Every block is a FrEIA ``AllInOneBlock`` conditioned (FrEIA's ``c``) on the positional code and each token's task
    index, so the task travels with the data, as an argument, through FrEIA into every subnet.

    Args:
        dim: Channels D (even).
        num_blocks: Number of coupling blocks (0 allowed: DIA-only models).
        grid: The patch grid ``(h, w)`` of every pass (fixed by the backbone and the image size).
        spatial_context_kernel: Kernel of the spatial context, 0 for none.
        scale_context_kernel: Kernel of each subnet's scale context, 0 for none.
        rank: LoRA rank.
        alpha: LoRA alpha.
        use_lora: Low-rank experts.
        position_dims: Channels of the 2D sinusoidal positional code given to every subnet as a condition (0: none;
            a multiple of 4).
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        grid: tuple[int, int],
        spatial_context_kernel: int,
        scale_context_kernel: int,
        rank: int,
        alpha: float,
        use_lora: bool,
        position_dims: int = 0,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.spatial_context = SpatialContext(dim, spatial_context_kernel) if spatial_context_kernel > 0 else None
        code = sinusoidal_position_embedding(*self.grid, position_dims) if position_dims else torch.zeros(*grid, 0)
        self.register_buffer("position_code", rearrange(code, "h w c -> (h w) c"), persistent=False)
        hidden = dim

        def subnet(c_in: int, c_out: int) -> MoLESubnet:
            return MoLESubnet(
                c_in, c_out, hidden, self.grid, position_dims, rank, alpha, use_lora, scale_context_kernel
            )

        self.blocks = SequenceINN(dim)
        for _ in range(num_blocks):
            self.blocks.append(
                AllInOneBlock,
                cond=0,
                cond_shape=(position_dims + 1,),
                subnet_constructor=subnet,
                affine_clamping=AFFINE_CLAMP,
            )
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

    def condition(self, image_tasks: torch.Tensor) -> torch.Tensor:
        """The blocks' condition ``((b h w), position_dims + 1)``: positional code, then each token's task index."""
        tokens = self.position_code.shape[0]
        code = repeat(self.position_code, "n c -> (b n) c", b=image_tasks.shape[0])
        task = repeat(image_tasks.to(code.dtype), "b -> (b n) 1", n=tokens)
        return torch.cat([code, task], dim=1)

    def forward(
        self, tokens: torch.Tensor, task: int | torch.Tensor, rev: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the coupling blocks on ``((b h w), d)`` tokens with the experts of ``task``.

        Args:
            tokens: Input tokens on the flow's grid.
            task: One task index for the batch, or one per image ``(b,)``.
            rev: Run the inverse.

        Returns:
            Output tokens and the per-token log-determinant ``((b h w),)``.
        """
        if len(self.blocks.module_list) == 0:
            return tokens, tokens.new_zeros(tokens.shape[0])
        images = tokens.shape[0] // self.position_code.shape[0]
        if not isinstance(task, torch.Tensor):
            task = torch.full((images,), task, dtype=torch.long, device=tokens.device)
        return self.blocks(tokens, c=[self.condition(task)], rev=rev)
