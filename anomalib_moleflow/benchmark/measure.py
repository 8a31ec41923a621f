"""Cost measurements: peak memory of a block of code, inference time per image."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torchvision.transforms.v2.functional import resize

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_large_frees(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with ``mmap``, so freeing them returns the memory.

    By default glibc raises its mmap threshold after the first large free, and later large tensors come from the heap,
    where interleaved small allocations keep freed blocks from being reused or returned. anomalib's coreset sampler
    allocates a (patches x features) temporary per selected sample: in one long process (a benchmark of many rows)
    this grew the resident memory by gigabytes for a few MB of data. A fixed threshold avoids that, and makes the
    per-row RSS measurement meaningful. No effect outside glibc.

    Returns:
        Whether the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def resolve_device(accelerator: str) -> torch.device:
    """The device Lightning will use for ``accelerator`` (``auto`` picks CUDA when present)."""
    if accelerator in {"auto", "gpu", "cuda"} and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _status_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of ``/proc/self/status`` in KiB (``None`` off Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process, in bytes (0 where unknown)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


class PeakMemory:
    """Peak memory used while the ``with`` block runs, above what was in use when it started.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). On CPU: the growth of the process's resident set
    size, sampled by a background thread and, where Linux allows it, read from the kernel's high-water mark
    (``VmHWM``, reset at the start through ``/proc/self/clear_refs``). Memory that an earlier block freed but the
    allocator kept is reused without counting, so on CPU the value is a lower bound of the block's own peak.

    Args:
        device: Device whose memory is measured.
        interval: Sampling period of the CPU thread, in seconds.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.02) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False

    @property
    def kind(self) -> str:
        """What is measured: ``"cuda_max_allocated"`` or ``"rss_growth"``."""
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_growth"

    @property
    def peak_mib(self) -> float:
        """Peak growth in MiB."""
        return max(0, self.peak - self.start) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> PeakMemory:
        """Start measuring."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = current_rss_bytes()
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop measuring (also on errors, so that a failed row still reports how far it got)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        hwm = _status_kib("VmHWM") if self._hwm_reset else None
        if hwm is not None:
            self.peak = max(self.peak, hwm * 1024)


def sample_images(datamodules: Sequence[Any], image_size: int, per_task: int) -> torch.Tensor:
    """Up to ``per_task`` test images of each datamodule (spread over its test set), resized to ``image_size``.

    The datamodules must be set up. Returns raw (not normalised) images ``(n, 3, image_size, image_size)``.
    """
    images = []
    for datamodule in datamodules:
        dataset = datamodule.test_data
        count = min(per_task, len(dataset))
        for index in torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist():
            image = dataset[index].image
            images.append(resize(torch.as_tensor(image), [image_size, image_size], antialias=True))
    return torch.stack(images)


@torch.no_grad()
def inference_ms_per_image(
    module: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    repeats: int = 3,
) -> float:
    """Milliseconds per image of ``module(images)`` (anomalib's full inference path: pre-process, model, post-process).

    One warm-up batch is not timed; then ``repeats`` passes over ``images`` are (CUDA synchronised before and after
    each) and the fastest counts: other work on a shared machine only ever slows a pass down. The module is moved to
    ``device`` and back to the CPU afterwards.
    """
    device = torch.device(device)
    module.eval()
    module.to(device)
    images = images.to(device)
    batch_size = max(1, batch_size)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one_pass() -> float:
        synchronize()
        start = time.perf_counter()
        for begin in range(0, images.shape[0], batch_size):
            module(images[begin : begin + batch_size])
        synchronize()
        return time.perf_counter() - start

    try:
        module(images[:batch_size])
        seconds = min(one_pass() for _ in range(max(1, repeats)))
    finally:
        module.to("cpu")
    return 1000.0 * seconds / images.shape[0]
