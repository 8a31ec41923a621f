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


def top_k_image_score(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` highest patch scores of each image: ``(b, h, w) -> (b,)``."""
    flat = patch_scores.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
