"""Early, readable checks of a datamodule's files, before any training starts."""

from __future__ import annotations

from pathlib import Path

from anomalib.data import AnomalibDataModule
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DatasetError(RuntimeError):
    """A dataset is missing or unreadable."""


def check_images(folder: Path, limit: int | None = None) -> int:
    """Open every image under ``folder`` (up to ``limit``) and fail on the first unreadable one.

    Grayscale and RGBA pictures are fine: anomalib converts them to RGB when it reads them.

    Returns:
        Number of images checked.
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files[:limit]:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            msg = f"'{path}' is not a readable image ({error}). Remove or replace it, then run again."
            raise DatasetError(msg) from error
    return len(files)


def check_datamodule(datamodule: AnomalibDataModule) -> None:
    """Fail early with a clear message when a file-based datamodule's data is missing or broken.

    Datamodules that generate their data (``SyntheticMVTecAD``) or have no ``root`` are skipped; for the others the
    category folder must exist with a non-empty ``train`` split, and its images must open.
    """
    if getattr(datamodule, "generates_data", False):
        return
    root = getattr(datamodule, "root", None)
    if root is None:
        return
    category = str(getattr(datamodule, "category", "") or "")
    folder = Path(root) / category if category and (Path(root) / category).exists() else Path(root)
    train = folder / "train"
    if not folder.exists() or (type(datamodule).__name__ in {"MVTecAD", "VisA"} and not train.exists()):
        msg = (
            f"Dataset not found for {type(datamodule).__name__} category '{category}' under '{root}'. "
            f"Download it (e.g. MVTec AD from its official page) and extract it so that '{train}' exists, "
            "or point `root` at it. To try the package offline, use `configs/continual/demo.yaml`."
        )
        raise DatasetError(msg)
    if check_images(folder) == 0:
        msg = f"No images found under '{folder}'."
        raise DatasetError(msg)
