"""Dataset folders written as a whole, and marked as ours, by the package's dataset writers.

A writer fills a hidden temporary sibling of the target folder, writes a JSON marker into it last, then renames it into
place, so a half-written folder never appears under its final name. The marker is also how the package recognises its
own folders: a folder without it was not written here and is never removed or overwritten.

Example:
    >>> with atomic_folder(Path("datasets/demo/wood"), ".synthetic.json", {"seed": 0}) as folder:  # doctest: +SKIP
    ...     (folder / "train").mkdir()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from anomalib_moleflow.errors import DatasetError

__all__ = ["ForeignFolderError", "atomic_folder", "check_owned", "holds_payload", "read_marker", "write_marker"]

logger = logging.getLogger(__name__)


class ForeignFolderError(DatasetError, FileExistsError):
    """A folder the package would write already exists, and the package did not create it."""


def read_marker(folder: Path, marker_name: str) -> object | None:
    """Parsed JSON marker ``folder/marker_name``, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / marker_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def holds_payload(folder: Path, marker_name: str, payload: Mapping[str, object]) -> bool:
    """Whether ``folder`` is complete and was written with ``payload`` (its marker ``marker_name`` equals it)."""
    return read_marker(folder, marker_name) == dict(payload)


def write_marker(folder: Path, marker_name: str, payload: Mapping[str, object]) -> Path:
    """Write ``payload`` as the JSON marker ``folder/marker_name`` and return its path."""
    path = Path(folder) / marker_name
    path.write_text(json.dumps(dict(payload), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def check_owned(target: Path, marker_name: str) -> None:
    """Make sure ``target`` is absent or was written by the package (holds a marker named ``marker_name``).

    Raises:
        ForeignFolderError: If ``target`` exists without the marker.
    """
    target = Path(target)
    if not (target.exists() or target.is_symlink()):
        return
    if isinstance(read_marker(target, marker_name), dict):
        return
    msg = (
        f"'{target}' already exists and was not created by anomalib_moleflow (it has no '{marker_name}' marker), "
        "so it is left untouched. Choose another `root`, or delete or move that folder yourself if you no longer "
        "need it."
    )
    raise ForeignFolderError(msg)


@contextmanager
def atomic_folder(target: Path, marker_name: str, payload: Mapping[str, object]) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` once the block completes.

    The temporary folder is a hidden sibling of ``target``. When the block exits normally, ``payload`` is written into
    it as the marker ``marker_name`` and it is renamed to ``target``; a previous ``target`` (which must carry our
    marker) is renamed aside first and then deleted. When the block raises, the temporary folder is deleted and
    ``target`` is left as it was. If another process puts a folder with the same marker payload in place meanwhile,
    that folder is kept.

    Args:
        target: Final folder; its parent is created if missing.
        marker_name: File name of the JSON marker (e.g. ``".synthetic.json"``).
        payload: Marker content, describing what was written (a JSON-serialisable mapping).

    Yields:
        The temporary folder to fill.

    Raises:
        ForeignFolderError: If ``target`` exists without a marker named ``marker_name`` (checked before the block
            runs and again before the rename).
    """
    target = Path(target)
    check_owned(target, marker_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates it private; the final folder gets the usual permissions
        yield tmp
        write_marker(tmp, marker_name, payload)  # written last: only a complete folder carries it
        _move_into_place(tmp, target, marker_name, payload)
    finally:
        _remove(tmp)


def _move_into_place(tmp: Path, target: Path, marker_name: str, payload: Mapping[str, object]) -> None:
    old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
    if target.exists() or target.is_symlink():
        check_owned(target, marker_name)
        if holds_payload(target, marker_name, payload):
            # Another process (e.g. a parallel run of a suite) wrote the same folder meanwhile and may be reading
            # it: keep it, drop ours.
            logger.debug("'%s' was written with the same settings meanwhile; keeping it.", target)
            return
        logger.info("Replacing '%s', which was written with other settings.", target)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target.exists() or target.is_symlink()) and (old.exists() or old.is_symlink()):
            os.replace(old, target)  # put the previous folder back
        if not holds_payload(target, marker_name, payload):
            raise
    finally:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
