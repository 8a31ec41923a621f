"""Checkpoint files: a SHA-256 checksum beside each one, and reading that fails with one clear message.

A checkpoint that is empty, truncated, bit-flipped, not a checkpoint at all, or holds non-finite weights is refused
before anything is loaded from it, so it can never produce NaN scores or overwrite a good model in memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalib_moleflow.errors import CheckpointError
from anomalib_moleflow.io import atomic_write_text

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: Path | str) -> Path:
    """Where the checksum of ``path`` is written: ``PATH.sha256`` (``sha256sum -c`` reads it)."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: Path | str) -> Path:
    """Write ``PATH.sha256`` beside ``path`` (atomically, in ``sha256sum``'s format); returns its path."""
    path = Path(path)
    return atomic_write_text(checksum_path(path), f"{sha256(path)}  {path.name}\n")


def check_finite_state(state_dict: Mapping[str, Any], source: str, prefix: str = "model.") -> None:
    """Refuse a state dict whose network tensors (keys starting with ``prefix``) hold NaN or infinity.

    Only the network is checked: a post-processor's statistics are NaN by design when normalisation is off.

    Raises:
        CheckpointError: Naming the first non-finite tensor.
    """
    import torch  # here, not at the top: the command line reads checksum paths without loading torch

    for key, value in state_dict.items():
        if (
            key.startswith(prefix)
            and isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not torch.isfinite(value).all()
        ):
            msg = (
                f"{source} holds non-finite weights ('{key}' has NaN or infinity): it was saved from a diverged "
                "training. Use an earlier checkpoint, or train that task again with a lower lr."
            )
            raise CheckpointError(msg)


def check_checkpoint_path(path: Path | str) -> Path:
    """``path`` as a ``Path`` if it is a file.

    Raises:
        FileNotFoundError: If it does not exist or is a folder.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        msg = f"Checkpoint '{path}' {problem}. Pass the model.ckpt that a finished run wrote."
        raise FileNotFoundError(msg)
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint after checking it: exists, not empty, matches its checksum (when one is beside it), readable.

    Returns:
        The checkpoint dictionary (tensors on the CPU).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file is empty, damaged, not a checkpoint, or holds non-finite network weights.
    """
    path = check_checkpoint_path(path)
    if path.stat().st_size == 0:
        msg = f"Checkpoint '{path}' is empty (0 bytes): its write or copy was interrupted. Copy it again or retrain."
        raise CheckpointError(msg)
    sidecar = checksum_path(path)
    if not sidecar.exists():
        logger.warning(
            "Checkpoint '%s' has no checksum beside it ('%s'): damage to it (a bad copy, a flipped bit) cannot be "
            "detected. Copy the checksum with the checkpoint, or write one: sha256sum %s > %s.",
            path,
            sidecar.name,
            path.name,
            sidecar.name,
        )
    else:
        expected = sidecar.read_text().split()[:1]
        if expected != [sha256(path)]:
            msg = (
                f"Checkpoint '{path}' does not match its checksum in '{sidecar.name}': the file changed after it was "
                "written (an incomplete copy or a disk error). Copy it again from where it was written, or retrain."
            )
            raise CheckpointError(msg)
    import torch

    try:
        # Our own checkpoints hold pickled settings (and the baselines' whole models), so they are read fully; the
        # checksum above is what guards against damage.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises a different type per kind of damage
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        msg = (
            f"Checkpoint '{path}' cannot be read ({type(error).__name__}: {reason}): it is truncated, damaged, not a "
            "checkpoint file, or written by other library versions. Pass the model.ckpt that a finished run wrote, "
            "or retrain."
        )
        raise CheckpointError(msg) from error
    if not isinstance(checkpoint, dict):
        msg = f"'{path}' is not a checkpoint (it holds a {type(checkpoint).__name__}, not a dictionary)."
        raise CheckpointError(msg)
    check_finite_state(checkpoint.get("state_dict", {}), f"Checkpoint '{path}'")
    return checkpoint
