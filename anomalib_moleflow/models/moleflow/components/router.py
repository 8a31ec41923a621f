"""Mahalanobis task router: one Gaussian prototype per task over image-level embeddings.

Two choices, both settings of the model: the image embedding (``mean`` or ``max`` of the patch embeddings over the
grid, or ``quadrant_max``: each channel's max within each quadrant, averaged over the quadrants) and the covariance
that decides the route (``task``: each task's own, ridged, as the study; ``pooled``: one covariance shared by all
tasks, the mean of each task's Ledoit-Wolf estimate, i.e. linear discriminant analysis). Each task's own covariance
always sets its unknown-product threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from ..settings import RouterCovariance, RouterEmbedding, check_choice

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


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf covariance ``(d, d)`` of ``(n, d)`` samples: the sample covariance shrunk towards a scaled identity.

    The shrinkage is the one that minimises the expected squared error (Ledoit & Wolf, 2004), estimated from the data:
    with about as many images as dimensions (a few hundred of each here) the sample covariance is far from the true
    one, and the optimal shrinkage is large. Written here because scikit-learn's ``ledoit_wolf`` would be a dependency
    for one formula.
    """
    n, d = x.shape
    centered = x - x.mean(0)
    sample = centered.T @ centered / n
    scale = sample.diagonal().mean()
    target_distance = (sample - scale * torch.eye(d, dtype=x.dtype, device=x.device)).square().sum() / d
    # Variance of the sample covariance's entries: mean over images of ||x x^T - S||^2, divided by n.
    spread = ((centered.square().sum(1).square().sum() / n - sample.square().sum()) / (n * d)).clamp_min(0)
    shrinkage = float(torch.clamp(spread / target_distance, max=1.0)) if target_distance > 0 else 1.0
    return (1 - shrinkage) * sample + shrinkage * scale * torch.eye(d, dtype=x.dtype, device=x.device)


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
    """Mean, precision and Ledoit-Wolf covariance (float64 fit) of one task's image embeddings, its unknown threshold.

    Args:
        dim: Embedding size D.
        eps: Ridge added to the covariance, relative to its mean variance (``+ eps * trace/D * I``).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        #: Ledoit-Wolf covariance: this task's share of the pooled covariance.
        self.register_buffer("covariance", torch.eye(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        #: Largest held-out distance of the task's training images (0: not measured, no unknown detection; not inf,
        #: so that every saved tensor stays finite).
        self.register_buffer("threshold", torch.zeros(()))
        # The embeddings (n x D floats, not images) exist only while the task is learned; they are not saved.
        self._embeddings: list[torch.Tensor] = []
        self._keyed: dict[str, torch.Tensor] = {}  # the same, by image path, when the images have paths

    @property
    def ready(self) -> bool:
        """Whether the prototype has been fitted."""
        return bool(self.count > 0)

    @torch.no_grad()
    def accumulate(self, embeddings: torch.Tensor, keys: Sequence[str] | None = None) -> None:
        """Collect ``(n, d)`` training embeddings, keyed by their images' paths when ``keys`` are given (an image seen
        twice, e.g. padded into two DDP shards, then counts once)."""
        embeddings = embeddings.detach().float().cpu()
        if keys is None:
            self._embeddings.append(embeddings)
        else:
            self._keyed.update(zip(keys, embeddings, strict=True))

    def share(self, gather: Callable[[Any], list[Any]]) -> None:
        """Replace the collected embeddings by those of every process (``gather``: one value per process)."""
        parts = gather((self._embeddings, self._keyed))
        self._embeddings = [chunk for embeddings, _ in parts for chunk in embeddings]
        self._keyed = {key: row for _, keyed in parts for key, row in keyed.items()}

    @torch.no_grad()
    def finalize(self) -> None:
        """Fit mean, precision and threshold on the collected embeddings; needs at least two.

        Keyed embeddings come first, sorted by path: the held-out folds of the threshold do not depend on the loader's
        shuffling or on how DDP sharded the images.
        """
        rows = [self._keyed[key][None] for key in sorted(self._keyed)] + self._embeddings
        x = torch.cat(rows).to(torch.float64) if rows else torch.zeros(0, len(self.mean))
        n = x.shape[0]
        if n < 2:
            msg = f"The router needs at least 2 training images per task, got {n}."
            raise ValueError(msg)
        mean, precision = _gaussian(x, self.eps)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.precision.copy_(precision.to(self.precision.dtype))
        self.covariance.copy_(ledoit_wolf(x).to(self.covariance.dtype))
        self.count.fill_(n)
        self._embeddings, self._keyed = [], {}
        if n >= 2 * THRESHOLD_FOLDS:
            self.threshold.fill_(float(held_out_distances(x, self.eps).max()))
        else:
            logger.warning(
                "Only %d training images: too few to measure the task's spread, so no image will be flagged as an "
                "unknown product (needs %d).",
                n,
                2 * THRESHOLD_FOLDS,
            )

    def distance(self, embeddings: torch.Tensor, precision: torch.Tensor | None = None) -> torch.Tensor:
        """Squared Mahalanobis distance ``(n,)`` of ``(n, d)`` embeddings to this task's mean, in this task's own
        metric or in ``precision`` (the router's pooled one)."""
        centered = embeddings.to(self.mean.dtype) - self.mean
        return torch.einsum("nd,de,ne->n", centered, self.precision if precision is None else precision, centered)


class RoutingLog:
    """The routing of each image (task, distance, unknown product), in the order the images were scored."""

    def __init__(self) -> None:
        self._chunks: list[Routed] = []

    @classmethod
    def of(cls, routed: Routed) -> RoutingLog:
        """A log holding ``routed``."""
        log = cls()
        log.append(routed)
        return log

    def routed(self) -> Routed:
        """Every recorded routing, concatenated."""
        return Routed(self.tasks(), self.distances(), self.unknown())

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


def image_embedding(patches: torch.Tensor, pooling: RouterEmbedding = "mean") -> torch.Tensor:
    """The image-level embedding the router works on: ``(b, h, w, d) -> (b, d)``.

    ``mean`` or ``max`` over the grid, or ``quadrant_max``: each channel's max within each quadrant of the grid
    (``h/2 x w/2``; an odd side's middle row or column belongs to both halves, as in adaptive max pooling), averaged
    over the four. The max keeps, for every channel, its strongest response anywhere in the image: what tells apart
    two products that differ in a local texture (two cell types of one solar panel), which the mean over the grid
    washes out. But a single region also sets it: a defect, a crack that blacks out part of the image, can give the
    max of an image the look of another product. Per quadrant, one region sets a quarter of the embedding, and a
    response counts fully only where the whole image holds it (regional max pooling, as in image retrieval's R-MAC).
    """
    if pooling == "mean":
        return patches.mean(dim=(1, 2))
    if pooling == "max":
        return patches.amax(dim=(1, 2))
    height, width = patches.shape[1:3]
    # Slices of the static shape and amax: the same regions as adaptive_max_pool2d, with only plain ops to export.
    rows = (slice(0, (height + 1) // 2), slice(height // 2, height))
    columns = (slice(0, (width + 1) // 2), slice(width // 2, width))
    return torch.stack([patches[:, r, c].amax(dim=(1, 2)) for r in rows for c in columns]).mean(0)


class MahalanobisRouter(nn.Module):
    """Route each image to the task whose prototype is nearest in Mahalanobis distance.

    Args:
        dim: Embedding size D.
        eps: Relative ridge of each task's own covariance.
        embedding: Image embedding (``mean``, ``max`` or ``quadrant_max`` of the patch embeddings; see
            :func:`image_embedding`).
        covariance: Covariance of the route: each ``task``'s own, or one ``pooled`` over the fitted tasks (the mean of
            their Ledoit-Wolf covariances). With a few hundred images per task in hundreds of dimensions, each task's
            own covariance is a noisy estimate, and comparing distances under different noisy metrics misroutes
            products that look alike; one shared, shrunk metric compares them on equal terms.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 0.01,
        embedding: RouterEmbedding = "quadrant_max",
        covariance: RouterCovariance = "pooled",
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("router_embedding", embedding, RouterEmbedding),
            ("router_covariance", covariance, RouterCovariance),
        ):
            check_choice(name, value, choices)
        self.dim = dim
        self.eps = eps
        self.embedding = embedding
        self.covariance = covariance
        self.prototypes = nn.ModuleList()
        #: Inverse of the mean Ledoit-Wolf covariance of the fitted tasks (refitted whenever a task is fitted).
        self.register_buffer("pooled_precision", torch.eye(dim))

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(b, d)`` of ``(b, h, w, d)`` patch embeddings."""
        return image_embedding(patches, self.embedding)

    def add_task(self) -> None:
        """Add an empty prototype for a new task."""
        self.prototypes.append(TaskPrototype(self.dim, self.eps))

    @torch.no_grad()
    def finalize(self, task: int) -> None:
        """Fit ``task``'s prototype on its collected embeddings, then the pooled covariance over every fitted task."""
        self.prototypes[task].finalize()
        covariances = [p.covariance.to(torch.float64) for p in self.prototypes if p.ready]
        pooled = torch.stack(covariances).mean(0)
        self.pooled_precision.copy_(torch.linalg.inv(pooled).to(self.pooled_precision.dtype))

    def _distances(self, embeddings: torch.Tensor, precision: torch.Tensor | None = None) -> torch.Tensor:
        """Distances ``(n, tasks)`` in each task's own metric or in ``precision`` (``inf`` where not fitted)."""
        # torch.where, not a Python test of ``count``: the exported graph must not branch on a buffer's value.
        columns = [torch.where(p.count > 0, p.distance(embeddings, precision), float("inf")) for p in self.prototypes]
        return torch.stack(columns, dim=1)

    def own_distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Distances ``(n, tasks)`` in each task's own metric, which its unknown-product threshold is measured in."""
        return self._distances(embeddings)

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Distances ``(n, tasks)`` that decide the route (``inf`` where a prototype is not fitted)."""
        return self._distances(embeddings, None if self.covariance == "task" else self.pooled_precision)

    def route(
        self,
        embeddings: torch.Tensor,
        unknown_factor: float | None = None,
        tasks: torch.Tensor | None = None,
    ) -> Routed:
        """Route ``(n, d)`` image embeddings to the nearest task, or to the given ``tasks``.

        Args:
            embeddings: Image embeddings.
            unknown_factor: An image farther than ``unknown_factor`` times the threshold from every task (each in its
                own covariance) is an unknown product; ``None``: never. Given tasks are never unknown.
            tasks: Task per image to use instead of the nearest (oracle routing, training).

        Returns:
            The task of each image and its distance to that task in the task's own covariance.
        """
        own = self.own_distances(embeddings)  # inf for a prototype not fitted yet (the task being learned)
        if tasks is not None:
            tasks = tasks.to(embeddings.device).long()
            return Routed(tasks, own.gather(1, tasks[:, None])[:, 0], torch.zeros_like(tasks, dtype=torch.bool))
        if not torch.compiler.is_exporting() and not any(p.ready for p in self.prototypes):
            msg = "The router has no fitted task yet: train at least one task before testing."
            raise RuntimeError(msg)
        task = self.distances(embeddings).argmin(dim=1)
        distance = own.gather(1, task[:, None])[:, 0]
        if unknown_factor is None:
            return Routed(task, distance, torch.zeros_like(task, dtype=torch.bool))
        thresholds = torch.stack([p.threshold.to(own.dtype) for p in self.prototypes])
        thresholds = torch.where(thresholds > 0, thresholds, torch.full_like(thresholds, float("inf")))
        return Routed(task, distance, (own > unknown_factor * thresholds).all(dim=1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Task index ``(n,)`` for ``(n, d)`` image embeddings."""
        return self.route(embeddings).task
