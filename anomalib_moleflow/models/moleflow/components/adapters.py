"""Per-task whitening adapter and the shared gated spatial context."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn

from ..settings import WhiteningNorm, check_choice

#: Variance floor of ``position`` normalisation, relative to each channel's mean variance over the grid (a position
#: whose feature never varies in training, e.g. a saturated background, must not turn noise into huge deviations).
POSITION_VARIANCE_FLOOR = 0.01


# gamma = 0.5 + 1.5 * sigmoid(raw) equals 1 when sigmoid(raw) = 1/3, i.e. raw = -log 2.
_GAMMA_IDENTITY_RAW = -math.log(2.0)


class WhiteningAdapter(nn.Module):
    """A normalisation without learned weights, then a bounded task-owned affine from identity.

    ``gamma = 0.5 + 1.5 * sigmoid(gamma_raw)`` lies in [0.5, 2] and ``beta = 2 * tanh(beta_raw)`` in [-2, 2]. The
    normalisation (``norm``) is a LayerNorm over each image's ``(h, w, d)`` features or each patch's ``d``, or, for
    ``position``, each position's and channel's standardisation with the task's training statistics there (a
    diagonal Padim in front of the flow), fitted once (:meth:`accumulate`, :meth:`finalize`) before the flow trains.

    Args:
        dim: Channels D.
        norm: What is normalised (see :data:`WhiteningNorm`).
        grid: The patch grid ``(h, w)`` (the shape of the ``position`` statistics).
    """

    def __init__(self, dim: int, norm: WhiteningNorm = "image", grid: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        check_choice("whitening_norm", norm, WhiteningNorm)
        self.dim = dim
        self.norm = norm
        self.gamma_raw = nn.Parameter(torch.full((dim,), _GAMMA_IDENTITY_RAW))
        self.beta_raw = nn.Parameter(torch.zeros(dim))
        shape = (*grid, dim) if norm == "position" else (0,)  # saved with the task only where they are used
        self.register_buffer("position_mean", torch.zeros(shape))
        self.register_buffer("position_std", torch.ones(shape))
        self.register_buffer("fitted", torch.tensor(norm != "position"))
        self._sums: list[torch.Tensor] = []  # count, sum, sum of squares while fitting (never saved)

    @property
    def needs_fit(self) -> bool:
        """Whether the statistics of ``position`` normalisation are still to be fitted."""
        return not bool(self.fitted)

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor) -> None:
        """Collect the statistics of ``(b, h, w, d)`` training features (float64 sums)."""
        x = x.detach().double()
        batch = [torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), x.pow(2).sum(0)]
        self._sums = batch if not self._sums else [a + b for a, b in zip(self._sums, batch, strict=True)]

    def share(self, gather: Callable[[Any], list[Any]]) -> None:
        """Replace the collected sums by their total over every process (``gather``: one value per process)."""
        parts = [part for part in gather([t.cpu() for t in self._sums]) if part]
        device = self._sums[0].device if self._sums else self.position_mean.device
        self._sums = [sum(column).to(device) for column in zip(*parts, strict=True)] if parts else []

    @torch.no_grad()
    def finalize(self) -> None:
        """Fit each position's mean and standard deviation from the collected features.

        Raises:
            ValueError: If fewer than two images were collected.
        """
        if not self._sums or float(self._sums[0]) < 2:
            msg = "whitening_norm='position' needs at least 2 training images per task to fit its statistics."
            raise ValueError(msg)
        count, total, squares = self._sums
        mean = total / count
        variance = ((squares - count * mean.pow(2)) / (count - 1)).clamp_min(0)
        floor = POSITION_VARIANCE_FLOOR * variance.mean(dim=(0, 1), keepdim=True)
        self.position_mean.copy_(mean.to(self.position_mean.dtype))
        self.position_std.copy_((variance + floor).sqrt().to(self.position_std.dtype))
        self.fitted.fill_(True)
        self._sums = []

    @property
    def gamma(self) -> torch.Tensor:
        """The bounded scale."""
        return 0.5 + 1.5 * torch.sigmoid(self.gamma_raw)

    @property
    def beta(self) -> torch.Tensor:
        """The bounded shift."""
        return 2.0 * torch.tanh(self.beta_raw)

    def log_abs_det(self) -> torch.Tensor:
        """``log|det|`` of the affine part per patch, ``sum(log gamma)``.

        The normalisation's own Jacobian is left out: it has no parameters (nothing is rewarded for shrinking), and
        for ``position`` its per-position constant would rank positions by their training variance, not by how
        unusual a patch is there.
        """
        return self.gamma.log().sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``(b, h, w, d)`` features."""
        return whiten(x, self.gamma, self.beta, self.norm, self.position_mean, self.position_std)


def whiten(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    norm: WhiteningNorm,
    position_mean: torch.Tensor | None = None,
    position_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise ``(b, h, w, d)`` features (see :class:`WhiteningAdapter`), then ``* gamma + beta``.

    ``position_mean`` / ``position_std`` are ``(h, w, d)``, or ``(b, h, w, d)`` for one task per image.
    """
    if x.ndim != 4:
        msg = f"Whitening takes patch grids (b, h, w, d), got shape {tuple(x.shape)}."
        raise ValueError(msg)
    if norm == "position":
        return (x - position_mean) / position_std * gamma + beta
    if norm == "patch_floored":
        # A per-patch LayerNorm whose variance is floored by the image's mean patch variance, so that a flat patch
        # (a dark pit's surroundings, a uniform background) is not blown up to unit scale; no library offers it.
        centred = x - x.mean(dim=-1, keepdim=True)
        variance = centred.square().mean(dim=-1, keepdim=True)  # (b, h, w, 1)
        floor = variance.mean(dim=(1, 2), keepdim=True)  # (b, 1, 1, 1)
        return centred * torch.rsqrt(variance + floor + 1e-5) * gamma + beta
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
    norm = adapters[0].norm
    mean = std = None
    if norm == "position":
        mean = torch.stack([adapter.position_mean for adapter in adapters])[image_tasks]  # (b, h, w, d)
        std = torch.stack([adapter.position_std for adapter in adapters])[image_tasks]
    whitened = whiten(x, gamma[:, None, None], beta[:, None, None], norm, mean, std)
    return whitened, gamma.log().sum(dim=-1)


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
