"""Patch embedding (PatchCore-style, no learned weights) and the fixed 2D sinusoidal positional code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from torch import nn


class PatchEmbedding(nn.Module):
    """Turn multi-stage CNN features into one ``embed_dim`` vector per patch of the finest grid.

    Each stage optionally gets a ``patch_size`` x ``patch_size`` local average (PatchCore's neighbourhood
    aggregation; the study uses 3), coarser stages are upsampled bilinearly to the finest grid, and the concatenated
    channels are reduced to ``embed_dim`` by adaptive average pooling along the channel axis. Nothing is learned.

    With ``stage_dims`` each stage is pooled to its own share of the channels instead, and coarser stages are
    upsampled by nearest neighbour, so that every coarse cell is a block of copies and each stage's own grid can be
    read back from the finest one (one flow per stage; the router and the feature cache keep one tensor).

    Args:
        embed_dim: Output channels D.
        patch_size: Size of the local averaging window (1: none).
        stage_dims: Each stage's channels in the output (summing to ``embed_dim``); ``None``: pooled together.
    """

    def __init__(self, embed_dim: int, patch_size: int = 1, stage_dims: list[int] | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.stage_dims = stage_dims
        self.pool = nn.AvgPool2d(patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Embed features.

        Args:
            features: Stage outputs, finest first, each ``(b, c_i, h_i, w_i)``.

        Returns:
            Patch embeddings ``(b, h, w, d)`` on the grid of the first stage.
        """
        height, width = features[0].shape[-2:]
        pooled = [self.pool(feature) for feature in features]
        if self.stage_dims is not None:
            parts = [
                F.interpolate(_pool_channels(p, dim), (height, width), mode="nearest")
                for p, dim in zip(pooled, self.stage_dims, strict=True)
            ]
            return rearrange(torch.cat(parts, dim=1), "b d h w -> b h w d")
        pooled = [
            p if p.shape[-2:] == (height, width) else F.interpolate(p, (height, width), mode="bilinear") for p in pooled
        ]
        stacked = rearrange(torch.cat(pooled, dim=1), "b c h w -> (b h w) 1 c")
        reduced = F.adaptive_avg_pool1d(stacked, self.embed_dim)
        return rearrange(reduced, "(b h w) 1 d -> b h w d", h=height, w=width)


def _pool_channels(features: torch.Tensor, dim: int) -> torch.Tensor:
    """``(b, c, h, w)`` features reduced to ``dim`` channels by adaptive average pooling along the channel axis."""
    if features.shape[1] == dim:
        return features
    height, width = features.shape[-2:]
    reduced = F.adaptive_avg_pool1d(rearrange(features, "b c h w -> (b h w) 1 c"), dim)
    return rearrange(reduced, "(b h w) 1 d -> b d h w", h=height, w=width)


#: Largest default embedding size: the study's D for WRN50 (layer2 + layer3 = 1536 channels).
MAX_DEFAULT_EMBED_DIM = 768


def default_embed_dim(channels: int) -> int:
    """The default D for a backbone whose chosen stages give ``channels`` channels in all.

    Adaptive average pooling to more channels than there are only repeats channels (no information, a bigger flow),
    so D is ``channels`` rounded down to a multiple of 4, capped at the study's 768 (WRN50: 1536 channels -> 768).
    """
    return max(4, min(MAX_DEFAULT_EMBED_DIM, channels - channels % 4))


def sinusoidal_position_embedding(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine/cosine code: the first half of the channels encode the row, the second half the column.

    Returns:
        Tensor ``(h, w, d)``.
    """
    if dim % 4 != 0:
        msg = f"The 2D positional embedding needs embed_dim divisible by 4, got {dim}."
        raise ValueError(msg)
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies  # (h, d/4)
    cols = torch.arange(width, dtype=torch.float32)[:, None] * frequencies  # (w, d/4)
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_code, col_code], dim=-1).contiguous()
