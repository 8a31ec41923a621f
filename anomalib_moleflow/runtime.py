"""Process settings our commands choose for themselves: the number of torch CPU threads, the libraries' log level."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_threads(requested: int | None = None) -> int:
    """torch CPU threads for a run: ``requested``, or the cores not already busy with other work.

    Two CPU-heavy processes each running one OpenMP thread per core slow each other down tenfold or more (the small
    flow tensors are the worst case), so the automatic choice leaves out the cores that the 1-minute load average
    says are busy, keeping at least one.

    Raises:
        ValueError: If ``requested`` is below 1.
    """
    if requested is not None:
        if requested < 1:
            msg = f"threads must be >= 1, got {requested}."
            raise ValueError(msg)
        return requested
    cores = usable_cores()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


@contextmanager
def torch_threads(requested: int | None = None) -> Iterator[int]:
    """Run the block with :func:`pick_threads` torch threads, then restore the previous count."""
    import torch  # here: the command line imports this module before it knows whether torch is needed

    previous = torch.get_num_threads()
    threads = pick_threads(requested)
    torch.set_num_threads(threads)
    logger.info("Using %d torch CPU thread(s) (%d usable cores).", threads, usable_cores())
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def quiet_libraries() -> None:
    """For the ``moleflow`` command (not the library): Lightning's per-fit device announcements and checkpoint notes.

    A continual run fits and tests dozens of times; Lightning announces the devices ("GPU available: ...") and its
    checkpoint defaults at INFO each time. Warnings stay visible.
    """
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning_fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
        "torch.utils.cpp_extension",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning calling a torch API that torch deprecated: about the two libraries, nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
