"""Per-task whitening adapter and the shared gated spatial context."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn

#: What the whitening adapter normalises over: ``image`` (default) standardises each image over all its patches and
#: channels, as anomalib's Fastflow does, so every patch keeps its magnitude relative to the image; ``patch`` is the
#: study's per-patch LayerNorm, which removes each patch's magnitude, often the strongest defect cue
#: (``docs/quality.md``, section 8d).
WhiteningNorm = Literal["image", "patch"]


def check_whitening_norm(norm: str) -> None:
    """Raise a ValueError naming the choices unless ``norm`` is a :data:`WhiteningNorm`."""
    if norm not in get_args(WhiteningNorm):
        msg = f"whitening_norm must be one of {get_args(WhiteningNorm)}, got {norm!r}."
        raise ValueError(msg)


# gamma = 0.5 + 1.5 * sigmoid(raw) equals 1 when sigmoid(raw) = 1/3, i.e. raw = -log 2.
_GAMMA_IDENTITY_RAW = -math.log(2.0)


class WhiteningAdapter(nn.Module):
    """LayerNorm without affine (over each image or each patch), then a bounded task-owned affine from identity.

    ``gamma = 0.5 + 1.5 * sigmoid(gamma_raw)`` lies in [0.5, 2] and ``beta = 2 * tanh(beta_raw)`` in [-2, 2].

    Args:
        dim: Channels D.
        norm: ``image``: normalise each image's ``(h, w, d)`` features together; ``patch``: each patch's ``d``.
    """

    def __init__(self, dim: int, norm: WhiteningNorm = "image") -> None:
        super().__init__()
        check_whitening_norm(norm)
        self.dim = dim
        self.norm = norm
        self.gamma_raw = nn.Parameter(torch.full((dim,), _GAMMA_IDENTITY_RAW))
        self.beta_raw = nn.Parameter(torch.zeros(dim))

    @property
    def gamma(self) -> torch.Tensor:
        """The bounded scale."""
        return 0.5 + 1.5 * torch.sigmoid(self.gamma_raw)

    @property
    def beta(self) -> torch.Tensor:
        """The bounded shift."""
        return 2.0 * torch.tanh(self.beta_raw)

    def log_abs_det(self) -> torch.Tensor:
        """``log|det|`` of the affine part per patch, ``sum(log gamma)`` (the LayerNorm has no parameters)."""
        return self.gamma.log().sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``(b, h, w, d)`` features."""
        return whiten(x, self.gamma, self.beta, self.norm)


def whiten(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, norm: WhiteningNorm) -> torch.Tensor:
    """LayerNorm of ``(b, h, w, d)`` features (no affine) over ``(h, w, d)`` or ``d``, then ``* gamma + beta``."""
    if x.ndim != 4:
        msg = f"Whitening takes patch grids (b, h, w, d), got shape {tuple(x.shape)}."
        raise ValueError(msg)
    return F.layer_norm(x, x.shape[-3:] if norm == "image" else x.shape[-1:]) * gamma + beta


def per_image_whitening(
    adapters: Sequence[WhiteningAdapter], x: torch.Tensor, image_tasks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whiten ``(b, h, w, d)`` features, image ``i`` with the adapter of task ``image_tasks[i]``.

    Returns:
        The features and each image's ``log|det|`` ``(b,)``.
    """
    gamma = torch.stack([adapter.gamma for adapter in adapters])[image_tasks]  # (b, d)
    beta = torch.stack([adapter.beta for adapter in adapters])[image_tasks]
    return whiten(x, gamma[:, None, None], beta[:, None, None], adapters[0].norm), gamma.log().sum(dim=-1)


class SpatialContext(nn.Module):
    """Depthwise k x k convolution over the patch grid, mixed in by a learned per-channel gate.

    ``out = (1 - sigmoid(g)) * x + sigmoid(g) * conv(x)``, the kernel starting as a k x k box filter.

    Args:
        dim: Channels D.
        kernel_size: Odd kernel size k.
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        nn.init.constant_(self.conv.weight, 1.0 / kernel_size**2)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix context into ``(b, h, w, d)`` patch features."""
        context = rearrange(self.conv(rearrange(x, "b h w d -> b d h w")), "b d h w -> b h w d")
        gate = torch.sigmoid(self.gate)
        return (1 - gate) * x + gate * context
