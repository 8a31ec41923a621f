"""Feature cache: an image's patch embedding computed once and reused, keyed by the image's path.

The backbone is frozen and the patch embedding has no trained parameters, so with deterministic transforms an
image's patch embedding never changes; recomputing it is most of an epoch's cost on a CPU. The model keeps one cache
per task's ``fit`` (training images, reused by the later epochs) and one per continual run (test images, reused when
earlier tasks are tested again), in memory or in a memory-mapped file when it would take more than a share of the
available memory. Lightning's loops and anomalib's datamodules are used as they are: the cache only answers "have I
seen this image path" inside ``training_step`` and ``test_step``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..settings import CacheDtype, CacheMode

logger = logging.getLogger(__name__)

#: ``auto`` keeps the cache in memory up to this share of the memory available when it starts.
MEMORY_SHARE = 0.25
#: Transforms (torchvision's v1 and v2, anomalib's) known to give the same output for the same image at every call.
#: Any other transform makes the features uncacheable: a random one (``Random*``, ``ColorJitter``, ``GaussianBlur``,
#: ``JPEG`` with a quality range, ...) and one we cannot know (``Lambda``, a user's own class).
DETERMINISTIC_TRANSFORMS = frozenset({
    "CenterCrop",
    "ConvertImageDtype",
    "ExportableCenterCrop",
    "Grayscale",
    "Identity",
    "Normalize",
    "Pad",
    "PILToTensor",
    "Resize",
    "RGB",
    "SquarePad",
    "ToDtype",
    "ToImage",
    "ToPureTensor",
    "ToTensor",
})  # fmt: skip
#: Containers: deterministic when every transform they hold is.
CONTAINER_TRANSFORMS = frozenset({"Compose", "Sequential"})


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; ``None`` elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def random_transform(transform: object) -> str | None:
    """The class name of the first transform in a (composed) transform that is not known to be deterministic
    (:data:`DETERMINISTIC_TRANSFORMS`: random or unknown alike), or ``None``."""
    if transform is None:
        return None
    name = type(transform).__name__
    if name in CONTAINER_TRANSFORMS:
        children = (random_transform(child) for child in getattr(transform, "transforms", transform))
        return next((child for child in children if child), None)
    return None if name in DETERMINISTIC_TRANSFORMS else name


def is_random(transform: object) -> bool:
    """Whether a (composed) transform may change an image's features from call to call (see
    :func:`random_transform`)."""
    return random_transform(transform) is not None


class FeatureCache:
    """Patch embeddings of a set of images, keyed by image path.

    Storage is chosen and allocated at the first :meth:`put`, when the size of one embedding is known.

    Args:
        num_images: Number of distinct images expected (rows of the disk cache).
        mode: ``memory``, ``disk`` (memory-mapped file in ``folder``), or ``auto`` (memory when the cache takes less
            than :data:`MEMORY_SHARE` of the available memory, else disk).
        dtype: Storage type; ``float16`` halves the size (the flow still computes in float32).
        folder: Where the disk cache's file goes (deleted by :meth:`close`).
    """

    def __init__(
        self,
        num_images: int,
        mode: CacheMode = "auto",
        dtype: CacheDtype = "float32",
        folder: Path | str | None = None,
    ) -> None:
        if mode not in {"auto", "memory", "disk"}:
            msg = f"FeatureCache mode must be 'auto', 'memory' or 'disk', got {mode!r}."
            raise ValueError(msg)
        self.num_images = num_images
        self.mode = mode
        self.dtype = dtype
        self.folder = folder
        self._rows: dict[str, int] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self._file: Path | None = None
        self._array: np.memmap | None = None

    def _allocate(self, shape: Sequence[int]) -> None:
        """Choose memory or disk for embeddings of ``shape`` ``(h, w, d)``; create the disk file."""
        size = self.num_images * int(np.prod(shape)) * (2 if self.dtype == "float16" else 4)
        if self.mode == "auto":
            available = available_memory()
            self.mode = "memory" if available is None or size <= MEMORY_SHARE * available else "disk"
        if self.mode == "disk":
            fd, name = tempfile.mkstemp(prefix="moleflow_features_", suffix=".npy", dir=self.folder)
            os.close(fd)
            self._file = Path(name)
            self._array = np.lib.format.open_memmap(name, mode="w+", dtype=self.dtype, shape=(self.num_images, *shape))
        logger.info(
            "Feature cache: %s, %s, up to %.1f MiB for %d images.", self.mode, self.dtype, size / 2**20, self.num_images
        )

    def __len__(self) -> int:
        return len(self._memory) + len(self._rows)

    def get(self, keys: Sequence[str], device: torch.device) -> torch.Tensor | None:
        """The cached ``(b, h, w, d)`` float32 embeddings of ``keys``, or ``None`` unless every key is cached."""
        if self.mode == "auto" or (self.mode == "disk" and self._array is None):
            return None  # nothing stored yet
        if self.mode == "memory":
            if not all(key in self._memory for key in keys):
                return None
            stacked = torch.stack([self._memory[key] for key in keys])
        else:
            if not all(key in self._rows for key in keys):
                return None
            stacked = torch.from_numpy(np.stack([self._array[self._rows[key]] for key in keys]))  # type: ignore[index]
        return stacked.to(device=device, dtype=torch.float32)

    def put(self, keys: Sequence[str], embeddings: torch.Tensor) -> None:
        """Store ``(b, h, w, d)`` embeddings under ``keys``."""
        if self.mode == "auto" or (self.mode == "disk" and self._array is None):
            self._allocate(embeddings.shape[1:])
        values = embeddings.detach().to("cpu", getattr(torch, self.dtype))
        for key, value in zip(keys, values, strict=True):
            if self.mode == "memory":
                self._memory[key] = value.clone()
            elif key not in self._rows:
                if len(self._rows) >= len(self._array):  # type: ignore[arg-type]
                    return  # more distinct images than announced: the rest are recomputed
                self._rows[key] = len(self._rows)
                self._array[self._rows[key]] = value.numpy()  # type: ignore[index]

    def close(self) -> None:
        """Free the memory and delete the disk file."""
        self._memory.clear()
        self._rows.clear()
        self._array = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
