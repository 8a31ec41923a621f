"""Mahalanobis task router: one Gaussian prototype per task over image-level embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TaskPrototype(nn.Module):
    """Mean and precision of one task's image embeddings, accumulated in float64 over training batches.

    Args:
        dim: Embedding size D.
        eps: Ridge added to the covariance, relative to its mean variance (``+ eps * trace/D * I``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # Running sums exist only while the task is being learned; they are not saved.
        self.register_buffer("_sum", torch.zeros(dim, dtype=torch.float64), persistent=False)
        self.register_buffer("_outer", torch.zeros(dim, dim, dtype=torch.float64), persistent=False)
        self.register_buffer("_pending", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def ready(self) -> bool:
        """Whether the prototype has been fitted."""
        return bool(self.count > 0)

    @torch.no_grad()
    def accumulate(self, embeddings: torch.Tensor) -> None:
        """Add ``(n, d)`` embeddings to the running sums."""
        x = embeddings.detach().to(torch.float64)
        self._sum += x.sum(0)
        self._outer += x.T @ x
        self._pending += x.shape[0]

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the running sums into mean and precision; needs at least two embeddings."""
        n = int(self._pending)
        if n < 2:
            msg = f"The router needs at least 2 training images per task, got {n}."
            raise ValueError(msg)
        mean = self._sum / n
        cov = (self._outer - n * torch.outer(mean, mean)) / (n - 1)
        ridge = self.eps * cov.diagonal().mean().clamp_min(1e-12)
        cov = cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.precision.copy_(torch.linalg.inv(cov).to(self.precision.dtype))
        self.count.fill_(n)
        self._sum.zero_()
        self._outer.zero_()
        self._pending.zero_()

    def distance(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance ``(n,)`` of ``(n, d)`` embeddings to this task."""
        centered = embeddings.to(self.mean.dtype) - self.mean
        return torch.einsum("nd,de,ne->n", centered, self.precision, centered)


class RoutingLog:
    """The task index used for each image, in the order the images were scored."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] = []

    def append(self, task_ids: torch.Tensor) -> None:
        """Record the task ids ``(b,)`` of one batch."""
        self._chunks.append(task_ids.detach().cpu())

    def tasks(self) -> torch.Tensor:
        """Every recorded task id, ``(n,)``."""
        return torch.cat(self._chunks) if self._chunks else torch.zeros(0, dtype=torch.long)

    def accuracy(self, task: int) -> float | None:
        """Share of the recorded images sent to ``task`` (``None`` when nothing was recorded)."""
        tasks = self.tasks()
        return float((tasks == task).float().mean()) if tasks.numel() else None


class RoutingRecorder:
    """The routing logs open on a model: :meth:`record` opens one for a block, :meth:`append` feeds every open one."""

    def __init__(self) -> None:
        self._logs: list[RoutingLog] = []

    @contextmanager
    def record(self) -> Iterator[RoutingLog]:
        """Inside the block, the returned log receives the task ids of every scored batch."""
        log = RoutingLog()
        self._logs.append(log)
        try:
            yield log
        finally:
            self._logs.remove(log)

    def append(self, task_ids: torch.Tensor) -> None:
        """Record the task ids ``(b,)`` of one batch in every open log."""
        for log in self._logs:
            log.append(task_ids)


class MahalanobisRouter(nn.Module):
    """Route each image to the task whose prototype is nearest in Mahalanobis distance.

    Args:
        dim: Embedding size D.
        eps: Relative covariance ridge.
    """

    def __init__(self, dim: int, eps: float = 0.01) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.prototypes = nn.ModuleList()

    def add_task(self) -> None:
        """Add an empty prototype for a new task."""
        self.prototypes.append(TaskPrototype(self.dim, self.eps))

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Distances ``(n, tasks)`` to every fitted prototype (``inf`` where a prototype is not fitted)."""
        columns = [
            p.distance(embeddings) if p.ready else embeddings.new_full((embeddings.shape[0],), float("inf"))
            for p in self.prototypes
        ]
        return torch.stack(columns, dim=1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Task index ``(n,)`` for ``(n, d)`` image embeddings."""
        if not any(p.ready for p in self.prototypes):
            msg = "The router has no fitted task yet: train at least one task before testing."
            raise RuntimeError(msg)
        return self.distances(embeddings).argmin(dim=1)
