"""One run on several devices (Lightning's ``--strategy ddp``): what each rank collected on its shard, combined.

Lightning shards every loader with a ``DistributedSampler`` and torchmetrics combines the metrics (anomalib's test
metrics, the post-processor's thresholds and min/max). What it cannot see is ours: the router's image embeddings,
the position-whitening sums, the held-out good images and the routing log. Each is gathered here, with
``torch.distributed.all_gather_object`` (gloo on CPUs, NCCL on GPUs); every rank must make the same calls in the
same order. Only rank 0 writes files (:func:`is_rank_zero`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Where launchers put a process's rank, in the order Lightning reads them (``lightning.fabric`` reads them at import,
#: 5 s that the command line's early refusals must not cost; torch is imported only when something is gathered).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or the only one); right also before the process group exists."""
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name]) == 0
    return True


def world_size() -> int:
    """Number of processes of the running DDP group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` without a DDP group). Tensors travel on the CPU."""
    size = world_size()
    if size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_in_order(values: torch.Tensor, total: int) -> torch.Tensor:
    """Per-image ``(n_rank, ...)`` values of an evaluation loader, put back in the dataset's order.

    Lightning's evaluation ``DistributedSampler`` (no shuffle) pads the ``total`` indices to a multiple of the world
    size and gives rank ``r`` indices ``r, r + W, r + 2W, ...``: interleaving the ranks' values and cutting the padding
    gives one value per image, in order.
    """
    import torch

    parts = gather_objects(values.detach().cpu())
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]
