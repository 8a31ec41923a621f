"""``moleflow convert-8bit``: a copy of a dataset folder whose 16-bit images anomalib can read.

anomalib reads every image with PIL's ``convert("RGB")``, which clips values above 255: a 16-bit image becomes
white. Scaling each image to its own range would break what anomaly detection compares (one image's brightness
against the others'), so every image is scaled by one factor, the largest pixel value in the whole dataset.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_moleflow.deploy.inferencer import IMAGE_SUFFIXES, WIDE_MODES

logger = logging.getLogger(__name__)

#: Folder names whose images are masks: converted to 0 / 255 instead of scaled.
MASK_FOLDERS = {"ground_truth", "masks", "mask"}


def _is_mask(path: Path, source: Path) -> bool:
    return any(part.lower() in MASK_FOLDERS for part in path.relative_to(source).parts[:-1])


def _wide_images(source: Path) -> list[Path]:
    found = []
    for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(path) as image:
            if image.mode in WIDE_MODES:
                found.append(path)
    return found


def convert_8bit(source: Path, target: Path) -> int:
    """Copy ``source`` to ``target``, writing images of more than 8 bits per channel as 8-bit grayscale.

    Images are scaled by 255 / (the largest value over all such images); masks (under a ``ground_truth`` or
    ``mask(s)`` folder) become 0 / 255. Every other file is copied unchanged.

    Args:
        source: Dataset folder (any layout, e.g. MVTec AD's).
        target: New folder; must not exist (nothing is ever overwritten).

    Returns:
        How many images were converted.

    Raises:
        FileNotFoundError: If ``source`` is not a folder.
        FileExistsError: If ``target`` exists.
    """
    source, target = Path(source), Path(target)
    if not source.is_dir():
        msg = f"'{source}' is not a folder."
        raise FileNotFoundError(msg)
    if target.exists():
        msg = f"'{target}' already exists; choose a new folder (nothing is overwritten)."
        raise FileExistsError(msg)
    wide = _wide_images(source)
    images = [path for path in wide if not _is_mask(path, source)]
    peak = max((float(np.asarray(Image.open(path)).max()) for path in images), default=1.0) or 1.0
    shutil.copytree(source, target)
    for path in wide:
        values = np.asarray(Image.open(path), dtype=np.float64)
        if _is_mask(path, source):
            pixels = np.where(values > 0, 255, 0)
        else:
            pixels = np.clip(np.rint(values * 255.0 / peak), 0, 255)
        out = target / path.relative_to(source)
        Image.fromarray(pixels.astype(np.uint8)).save(out)
    logger.info("Converted %d image(s) to 8 bits (scale 255 / %g) into '%s'.", len(wide), peak, target)
    return len(wide)
