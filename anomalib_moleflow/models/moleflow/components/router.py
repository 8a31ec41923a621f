"""Mahalanobis task router: one Gaussian prototype per task over image-level embeddings."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Folds of the held-out distances that set a task's unknown-product threshold.
THRESHOLD_FOLDS = 5


class Routed(NamedTuple):
    """How a batch was routed.

    Attributes:
        task: Task index per image ``(b,)``.
        distance: Squared Mahalanobis distance to that task's prototype ``(b,)``.
        unknown: ``(b,)`` True where the image lies beyond every task's threshold: a product the model never learned.
    """

    task: torch.Tensor
    distance: torch.Tensor
    unknown: torch.Tensor


def _gaussian(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision of ``(n, d)`` float64 embeddings, the covariance ridged by ``eps`` times its mean variance."""
    n = x.shape[0]
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / (n - 1)
    ridge = eps * cov.diagonal().mean().clamp_min(1e-12)
    return mean, torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))


def held_out_distances(x: torch.Tensor, eps: float, folds: int = THRESHOLD_FOLDS) -> torch.Tensor:
    """Squared Mahalanobis distance ``(n,)`` of each embedding to a Gaussian fitted on the other folds.

    Distances of the fitting embeddings themselves are biased low (the covariance has seen them; with fewer images
    than dimensions, far too low), so a product's spread is measured on embeddings held out of the fit, as new images
    of the product will be.
    """
    n = x.shape[0]
    k = min(folds, n)
    fold = torch.arange(n, device=x.device) % k
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for f in range(k):
        held = fold == f
        mean, precision = _gaussian(x[~held], eps)
        centered = x[held] - mean
        out[held] = torch.einsum("nd,de,ne->n", centered, precision, centered)
    return out


class TaskPrototype(nn.Module):
    """Mean and precision (float64 fit) of one task's image embeddings, and its unknown-product threshold.

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
        #: Largest held-out distance of the task's training images (0: not measured, no unknown detection; not inf,
        #: so that every saved tensor stays finite).
        self.register_buffer("threshold", torch.zeros(()))
        # The embeddings (n x D floats, not images) exist only while the task is learned; they are not saved.
        self._embeddings: list[torch.Tensor] = []

    @property
    def ready(self) -> bool:
        """Whether the prototype has been fitted."""
        return bool(self.count > 0)

    @torch.no_grad()
    def accumulate(self, embeddings: torch.Tensor) -> None:
        """Collect ``(n, d)`` training embeddings."""
        self._embeddings.append(embeddings.detach().float().cpu())

    @torch.no_grad()
    def finalize(self) -> None:
        """Fit mean, precision and threshold on the collected embeddings; needs at least two."""
        x = torch.cat(self._embeddings).to(torch.float64) if self._embeddings else torch.zeros(0, len(self.mean))
        n = x.shape[0]
        if n < 2:
            msg = f"The router needs at least 2 training images per task, got {n}."
            raise ValueError(msg)
        mean, precision = _gaussian(x, self.eps)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.precision.copy_(precision.to(self.precision.dtype))
        self.count.fill_(n)
        self._embeddings = []
        if n >= 2 * THRESHOLD_FOLDS:
            self.threshold.fill_(float(held_out_distances(x, self.eps).max()))
        else:
            logger.warning(
                "Only %d training images: too few to measure the task's spread, so no image will be flagged as an "
                "unknown product (needs %d).",
                n,
                2 * THRESHOLD_FOLDS,
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before the threshold existed load without it: no unknown-product detection for them.
        state_dict.setdefault(f"{prefix}threshold", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def distance(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance ``(n,)`` of ``(n, d)`` embeddings to this task."""
        centered = embeddings.to(self.mean.dtype) - self.mean
        return torch.einsum("nd,de,ne->n", centered, self.precision, centered)


class RoutingLog:
    """The routing of each image (task, distance, unknown product), in the order the images were scored."""

    def __init__(self) -> None:
        self._chunks: list[Routed] = []

    def append(self, routed: Routed | torch.Tensor) -> None:
        """Record one batch's routing (or only its task ids ``(b,)``: distance NaN, not unknown)."""
        if isinstance(routed, torch.Tensor):
            routed = Routed(routed, torch.full(routed.shape, float("nan")), torch.zeros(routed.shape, dtype=torch.bool))
        self._chunks.append(Routed(*(tensor.detach().cpu() for tensor in routed)))

    def latest(self) -> Routed:
        """The routing of the batch recorded last.

        Raises:
            LookupError: If nothing was recorded.
        """
        if not self._chunks:
            msg = "Nothing was routed yet."
            raise LookupError(msg)
        return self._chunks[-1]

    def tasks(self) -> torch.Tensor:
        """Every recorded task id, ``(n,)``."""
        return torch.cat([c.task for c in self._chunks]) if self._chunks else torch.zeros(0, dtype=torch.long)

    def distances(self) -> torch.Tensor:
        """Every recorded router distance, ``(n,)`` (NaN where not measured)."""
        return torch.cat([c.distance.double() for c in self._chunks]) if self._chunks else torch.zeros(0)

    def unknown(self) -> torch.Tensor:
        """Every recorded unknown-product flag, ``(n,)``."""
        return torch.cat([c.unknown for c in self._chunks]) if self._chunks else torch.zeros(0, dtype=torch.bool)

    def unknown_rate(self) -> float | None:
        """Share of the recorded images flagged as an unknown product (``None`` when nothing was recorded)."""
        unknown = self.unknown()
        return float(unknown.float().mean()) if unknown.numel() else None

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

    def append(self, routed: Routed | torch.Tensor) -> None:
        """Record one batch's routing (or task ids ``(b,)``) in every open log."""
        for log in self._logs:
            log.append(routed)


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
        # torch.where, not a Python test of ``count``: the exported graph must not branch on a buffer's value.
        columns = [torch.where(p.count > 0, p.distance(embeddings), float("inf")) for p in self.prototypes]
        return torch.stack(columns, dim=1)

    def route(
        self,
        embeddings: torch.Tensor,
        unknown_factor: float | None = None,
        tasks: torch.Tensor | None = None,
    ) -> Routed:
        """Route ``(n, d)`` image embeddings to the nearest task, or to the given ``tasks``.

        Args:
            embeddings: Image embeddings.
            unknown_factor: An image farther than ``unknown_factor`` times the threshold from every task is an unknown
                product; ``None``: never. Given tasks are never unknown.
            tasks: Task per image to use instead of the nearest (oracle routing, training).
        """
        distances = self.distances(embeddings)  # inf for a prototype not fitted yet (the task being learned)
        if tasks is not None:
            tasks = tasks.to(embeddings.device).long()
            return Routed(tasks, distances.gather(1, tasks[:, None])[:, 0], torch.zeros_like(tasks, dtype=torch.bool))
        if not torch.compiler.is_exporting() and not any(p.ready for p in self.prototypes):
            msg = "The router has no fitted task yet: train at least one task before testing."
            raise RuntimeError(msg)
        distance, task = distances.min(dim=1)
        if unknown_factor is None:
            return Routed(task, distance, torch.zeros_like(task, dtype=torch.bool))
        thresholds = torch.stack([p.threshold.to(distances.dtype) for p in self.prototypes])
        thresholds = torch.where(thresholds > 0, thresholds, torch.full_like(thresholds, float("inf")))
        return Routed(task, distance, (distances > unknown_factor * thresholds).all(dim=1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Task index ``(n,)`` for ``(n, d)`` image embeddings."""
        return self.route(embeddings).task
