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


def _moments(total: torch.Tensor, total_squares: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample standard deviation from float64 sums over ``count`` values (a never-varying one floored)."""
    mean = total / count
    std = ((total_squares - count * mean.square()) / (count - 1)).clamp_min(0).sqrt()
    return mean, std.clamp_min(1e-3 * float(std.mean()) + 1e-12)  # a position that never varied must not blow up


def position_capped(
    values: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``(b, h, w)`` map values, each capped by its standard score at its own position (``mean_p``, ``std_p``) put on
    the overall scale (``mean``, ``std``): ``min(v, mean + std * (v - mean_p) / std_p)``; all arguments broadcast."""
    return torch.minimum(values, mean + std * (values - mean_p) / std_p)


class PositionCalibration(nn.Module):
    """One task's statistics of its patch scores and map values, from the task's own good training images.

    A density scores a patch by how rare it is among all of the task's patches, wherever they lie; on an aligned
    product some places (a part's rim, a fold, the image border) hold rare patches in every good image, and those are
    its false positives. ``(score - mean) / std`` at each grid position, both over the task's training images (Padim's
    per-position principle, applied to the flow's score), removes them; where a product is not aligned the
    statistics are the same at every position and the map only shifts and scales. Unfitted, it is the identity.

    The map value (each patch's likelihood, :func:`likelihood_map_value`) keeps its own statistics, at each position
    and over all of them, for :meth:`calibrate_map`.

    Args:
        grid: The patch grid ``(h, w)``.
    """

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(grid))
        self.register_buffer("std", torch.ones(grid))
        self.register_buffer("map_mean", torch.zeros(grid))
        self.register_buffer("map_std", torch.ones(grid))
        self.register_buffer("map_overall", torch.tensor([0.0, 1.0]))  # mean, std over every position
        #: Whether :meth:`fit` set the statistics (loaded ones count, unless they are the identity's).
        self.fitted = False
        #: Whether the map value's statistics are set (a checkpoint written before they existed has none).
        self.map_fitted = False
        self.register_load_state_dict_pre_hook(_identity_when_missing)
        self.register_load_state_dict_post_hook(_fitted_unless_identity)

    def fit(
        self,
        scores: tuple[torch.Tensor, torch.Tensor],
        map_values: tuple[torch.Tensor, torch.Tensor],
        count: int,
    ) -> None:
        """Set the statistics from float64 sums ``(total, total_squares)`` over ``count`` ≥ 2 images' ``(h, w)``
        patch scores and map values."""
        if count < 2:
            msg = f"Per-position score statistics need at least 2 training images, got {count}."
            raise ValueError(msg)
        for (mean, std), (total, total_squares) in ((("mean", "std"), scores), (("map_mean", "map_std"), map_values)):
            fitted_mean, fitted_std = _moments(total, total_squares, count)
            getattr(self, mean).copy_(fitted_mean)
            getattr(self, std).copy_(fitted_std)
        total, total_squares = map_values
        self.map_overall.copy_(torch.stack(_moments(total.sum(), total_squares.sum(), count * total.numel())))
        self.fitted = self.map_fitted = True

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Standardise ``(b, h, w)`` patch scores position by position."""
        return (patch_scores - self.mean) / self.std

    def calibrate_map(self, values: torch.Tensor) -> torch.Tensor:
        """``(b, h, w)`` map values, each capped by what its standard score at its own position is on the task's overall
        scale: ``min(v, mean + std * (v - mean_p) / std_p)`` (``mean``, ``std`` over every position; ``_p``: at the
        patch's own).

        A patch stays high only where it is unusual both for the product and for its place: a rare patch where such
        patches always lie (a rim, a thread) is explained by its position, a patch at an unusual place on a product
        that is not aligned (the part shifted) by the product as a whole. The map keeps the likelihood's own scale, so
        the stages weigh in as they do in the plain likelihood map. Unfitted (the identity's statistics), the values
        as they are.
        """
        return position_capped(values, self.map_mean, self.map_std, self.map_overall[0], self.map_overall[1])


def _fitted_unless_identity(module: nn.Module, incompatible_keys: object) -> None:
    """After loading: the statistics are fitted unless they hold the identity's (unfitted when saved)."""
    del incompatible_keys
    module.fitted = not (bool((module.mean == 0).all()) and bool((module.std == 1).all()))
    module.map_fitted = not (bool((module.map_mean == 0).all()) and bool((module.map_std == 1).all()))


def _identity_when_missing(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A checkpoint written before the statistics existed loads them unfitted (its task scores as it did), also into a
    module that was fitted before."""
    del args
    identity = PositionCalibration(tuple(module.mean.shape)).to(module.mean.device)
    for name in ("mean", "std", "map_mean", "map_std", "map_overall"):
        state_dict.setdefault(f"{prefix}{name}", getattr(identity, name))
