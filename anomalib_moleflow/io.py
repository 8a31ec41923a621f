"""Output files: atomic writes (a crash leaves the old file or the new one, never a partial one), output folders."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary sibling of ``path``, then move it into place.

    The file gets the permissions of a normally created file (``0o666`` minus the umask), not the ``0o600`` of
    :func:`tempfile.mkstemp`.

    Args:
        path: Destination.
        write: Writes the content to the path it is given.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(0o666 & ~_umask())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def claim_output_dir(
    folder: Path | str, outputs: Sequence[str], resume: bool, overwrite: bool, resumable: bool = True
) -> None:
    """Make sure a new run neither mixes with nor silently replaces an earlier run's outputs in ``folder``.

    Args:
        folder: The run's output folder.
        outputs: Glob patterns (relative to ``folder``) of what a run writes there: the only entries ``overwrite``
            removes, so that a user's other files in the folder stay.
        resume: The run continues the earlier one: its outputs are kept.
        overwrite: Remove the earlier run's outputs first.
        resumable: The command has a ``--resume`` option (named in the message).

    Raises:
        ValueError: If both ``resume`` and ``overwrite`` are set.
        FileExistsError: If ``folder`` holds an earlier run's outputs and neither is set.
    """
    if resume and overwrite:
        msg = "--resume and --overwrite exclude each other: --resume continues the run in the folder, --overwrite "
        msg += "deletes it. Pass one of them."
        raise ValueError(msg)
    folder = Path(folder)
    found = sorted({path for pattern in outputs for path in folder.glob(pattern)}) if folder.is_dir() else []
    if not found or resume:
        return
    names = ", ".join(path.name for path in found[:5]) + (", ..." if len(found) > 5 else "")
    if not overwrite:
        resume_hint = "--resume to continue that run, " if resumable else ""
        msg = (
            f"'{folder}' already holds the outputs of an earlier run ({names}). Pass {resume_hint}--overwrite to "
            "delete its outputs and start again, or choose another --output."
        )
        raise FileExistsError(msg)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info("Deleted the earlier run's outputs in '%s' (--overwrite): %s", folder, names)
