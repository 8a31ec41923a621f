"""Anomaly map and image score from patch negative log-likelihoods."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components import GaussianBlur2d
from torch import nn


class AnomalyMapGenerator(nn.Module):
    """Bilinear upsampling of the patch NLL map to image size, then a Gaussian blur.

    Args:
        sigma: Standard deviation of the blur, in pixels; 0: no blur.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        self.blur: nn.Module = nn.Identity()
        if sigma > 0:
            self.blur = GaussianBlur2d(sigma=sigma, channels=1)  # anomalib's kernel size: 2 * int(4 sigma + 0.5) + 1
            # The kernel follows from sigma, a scoring setting: kept out of the state dict so that a checkpoint loads
            # with any sigma.
            self.blur.register_buffer("kernel", self.blur.kernel, persistent=False)
        self.register_load_state_dict_pre_hook(_drop_saved_kernel)

    def forward(self, patch_scores: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Map ``(b, h, w)`` patch scores to a ``(b, 1, H, W)`` anomaly map."""
        upsampled = F.interpolate(patch_scores.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
        return self.blur(upsampled)


def _drop_saved_kernel(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Ignore the blur kernel that checkpoints of earlier versions saved (it is rebuilt from ``sigma``)."""
    del module, args
    state_dict.pop(f"{prefix}blur.kernel", None)


def likelihood_map_value(nll: torch.Tensor, dim: int) -> torch.Tensor:
    """Each patch's likelihood per dimension, negated so that higher is more anomalous: ``-exp(-NLL / D)``.

    anomalib's Fastflow maps this value, not the NLL. It is a concave, increasing function of the NLL: a few patches
    with extreme NLLs (rare normal patches) are capped near 0, so the map's upsampling and blur, which average
    neighbouring patches, favour a region of raised NLLs over an isolated spike (docs/quality.md 0j).
    """
    return -torch.exp(-(nll / dim).clamp_min(-80.0))  # the clamp keeps exp finite for very likely patches


def top_k_image_score(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` highest patch scores of each image: ``(b, h, w) -> (b,)``."""
    flat = patch_scores.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


class PositionCalibration(nn.Module):
    """One task's per-position standardisation of its patch scores, from the task's own good training images.

    A density scores a patch by how rare it is among all of the task's patches, wherever they lie; on an aligned
    product some places (a part's rim, a fold, the image border) hold rare patches in every good image, and those are
    its false positives. ``(score - mean) / std`` at each grid position, both over the task's training images (Padim's
    per-position principle, applied to the flow's score), removes them; where a product is not aligned the
    statistics are the same at every position and the map only shifts and scales. Unfitted, it is the identity.

    Args:
        grid: The patch grid ``(h, w)``.
    """

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(grid))
        self.register_buffer("std", torch.ones(grid))
        #: Whether :meth:`fit` set the statistics (loaded ones count, unless they are the identity's).
        self.fitted = False
        self.register_load_state_dict_pre_hook(_identity_when_missing)
        self.register_load_state_dict_post_hook(_fitted_unless_identity)

    def fit(self, total: torch.Tensor, total_squares: torch.Tensor, count: int) -> None:
        """Set the statistics from sums over ``count`` ≥ 2 images' ``(h, w)`` patch scores (float64 sums)."""
        if count < 2:
            msg = f"Per-position score statistics need at least 2 training images, got {count}."
            raise ValueError(msg)
        mean = total / count
        variance = ((total_squares - count * mean.square()) / (count - 1)).clamp_min(0)
        std = variance.sqrt()
        floor = 1e-3 * float(std.mean()) + 1e-12  # a position whose score never varied must not blow up
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.clamp_min(floor).to(self.std))
        self.fitted = True

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Standardise ``(b, h, w)`` patch scores position by position."""
        return (patch_scores - self.mean) / self.std


def _fitted_unless_identity(module: nn.Module, incompatible_keys: object) -> None:
    """After loading: the calibration is fitted unless it holds the identity's statistics (unfitted when saved)."""
    del incompatible_keys
    module.fitted = not (bool((module.mean == 0).all()) and bool((module.std == 1).all()))


def _identity_when_missing(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A checkpoint written before the calibration existed loads it unfitted (its task scores as it did)."""
    del args
    for name in ("mean", "std"):
        state_dict.setdefault(f"{prefix}{name}", getattr(module, name).clone())
