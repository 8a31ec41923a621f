"""Early, readable checks of a datamodule's files, before any training starts.

anomalib reports a missing mask as a pandas length error, a missing category as "Found 0 images", an empty
training folder only when the first epoch is empty, and reads 16-bit images as white. These checks name the file or
folder and say what to do, before the first task trains. They apply to every datamodule: generated ones are
generated first and checked like the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from anomalib.data import AnomalibDataModule
from PIL import Image, UnidentifiedImageError

from anomalib_moleflow.deploy.inferencer import IMAGE_SUFFIXES, WIDE_MODES
from anomalib_moleflow.errors import DatasetError


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def check_image(path: Path) -> tuple[int, int]:
    """Open an image fully; return its ``(width, height)``.

    Grayscale, RGB and RGBA pictures are fine (anomalib converts them to RGB).

    Raises:
        DatasetError: If the file is not a readable image, or has more than 8 bits per channel.
    """
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        msg = f"'{path}' is not a readable image ({error}). Remove or replace it, then run again."
        raise DatasetError(msg) from error
    if mode in WIDE_MODES:
        msg = (
            f"'{path}' has {'16-bit' if 'I;16' in mode else 'wide'} pixels (PIL mode {mode}); anomalib's image "
            "reader would clip them to white. Convert the dataset to 8 bits with one scale for all images: "
            "`moleflow convert-8bit SOURCE TARGET`, then point `root` at TARGET."
        )
        raise DatasetError(msg)
    return size


def check_images(folder: Path, limit: int | None = None) -> int:
    """Check every image under ``folder`` (up to ``limit``) with :func:`check_image`; returns how many there are."""
    files = _images(folder)
    for path in files[:limit]:
        check_image(path)
    return len(files)


def _categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []


def _missing(datamodule: AnomalibDataModule, expected: Path, root: Path) -> DatasetError:
    category = str(getattr(datamodule, "category", "") or "")
    found = _categories(root)
    where = f" '{root}' holds the categories {found}." if found else ""
    msg = (
        f"Dataset not found for {type(datamodule).__name__} category '{category}': '{expected}' does not exist."
        f"{where} Download the dataset (e.g. MVTec AD from its official page) and extract it so that '{expected}' "
        "exists, or fix `root`/`category`. To try the package offline, use `configs/continual/demo.yaml`."
    )
    return DatasetError(msg)


def _mvtec_layout_folder(datamodule: AnomalibDataModule) -> Path | None:
    """The category folder of MVTec-layout datamodules (MVTecAD and its subclasses, VisA after its split)."""
    names = {cls.__name__ for cls in type(datamodule).__mro__}
    root, category = Path(datamodule.root), str(datamodule.category)  # type: ignore[attr-defined]
    if "MVTecAD" in names:
        return root / category
    if "Visa" in names or "VisA" in names:
        split = root / "visa_pytorch" / category
        if not (split.is_dir() or (root / category).is_dir()):
            raise _missing(datamodule, root / category, root)
        datamodule.prepare_data()  # splits the raw VisA folder locally (no download: it exists)
        return split
    return None


def _check_mvtec_layout(datamodule: AnomalibDataModule, folder: Path) -> None:
    """Training folder not empty, every defect image with its mask (before anomalib parses the folder)."""
    train = folder / "train" / "good"
    if not folder.is_dir() or not (folder / "train").is_dir():
        raise _missing(datamodule, folder / "train", folder.parent)
    if not _images(train):
        msg = f"No training images in '{train}': put the product's normal (defect-free) images there."
        raise DatasetError(msg)
    test = folder / "test"
    for defect in sorted(p for p in test.iterdir() if p.is_dir() and p.name != "good") if test.is_dir() else []:
        masks = {p.stem for p in _images(folder / "ground_truth" / defect.name)}
        for image in _images(defect):
            if image.stem not in masks and f"{image.stem}_mask" not in masks:
                msg = (
                    f"Defect image '{image}' has no mask: expected '{folder / 'ground_truth' / defect.name}/"
                    f"{image.stem}_mask.png' (or '{image.stem}.png'). Add the mask, or move the image out of 'test/'."
                )
                raise DatasetError(msg)


def _paths(samples: pd.DataFrame, column: str) -> Iterable[str]:
    return [str(p) for p in samples.get(column, pd.Series(dtype=str)) if isinstance(p, str) and p]


def _check_samples(datamodule: AnomalibDataModule) -> None:
    """After ``setup``: a non-empty training split, readable 8-bit images, and a mask of the image's size."""
    train = datamodule.train_data.samples
    if len(train) == 0:
        where = getattr(datamodule, "normal_dir", None) or getattr(datamodule, "root", "the dataset")
        msg = f"No training images in '{where}': put the product's normal (defect-free) images there."
        raise DatasetError(msg)
    for path in _paths(train, "image_path"):
        check_image(Path(path))
    test = datamodule.test_data.samples
    segmentation = any(_paths(test, "mask_path"))
    for row in test.itertuples():
        size = check_image(Path(row.image_path))
        mask = getattr(row, "mask_path", None)
        if not segmentation or int(row.label_index) != 1:
            continue
        if not (isinstance(mask, str) and mask and Path(mask).is_file()):
            msg = f"Defect image '{row.image_path}' has no mask (mask path: {mask!r}). Add it, or remove the image."
            raise DatasetError(msg)
        mask_size = check_image(Path(mask))
        if mask_size != size:
            msg = (
                f"Mask '{mask}' is {mask_size[0]}x{mask_size[1]} px but its image '{row.image_path}' is "
                f"{size[0]}x{size[1]} px. Masks must have their image's size: resize or replace the mask."
            )
            raise DatasetError(msg)


def check_datamodule(datamodule: AnomalibDataModule) -> None:
    """Fail early with a clear message when a datamodule's data is missing, incomplete or unreadable.

    Generated datamodules (``generates_data``) are generated first. MVTec-layout folders are checked before anomalib
    parses them (category and training folder present, a mask for every defect image); then, for every datamodule
    with a ``root``, the set-up splits are checked (training images present, images readable with at most 8 bits
    per channel, masks of their image's size). Datamodules that read no files (no ``root`` and no ``normal_dir``) are
    skipped.

    Raises:
        DatasetError: Naming the file or folder and what to do.
    """
    root = getattr(datamodule, "root", None)
    if root is None and getattr(datamodule, "normal_dir", None) is None:
        return  # not read from files
    if getattr(datamodule, "generates_data", False):
        datamodule.prepare_data()
    elif root is not None and not Path(root).exists():
        category = str(getattr(datamodule, "category", "") or "")
        raise _missing(datamodule, Path(root) / category / "train" if category else Path(root), Path(root))
    folder = _mvtec_layout_folder(datamodule) if root is not None else None
    if folder is not None:
        _check_mvtec_layout(datamodule, folder)
    try:
        datamodule.setup()
    except DatasetError:
        raise
    except Exception as error:  # anomalib's own parse errors, re-worded with where to look
        msg = f"anomalib could not read the dataset under '{folder or root}': {type(error).__name__}: {error}"
        raise DatasetError(msg) from error
    _check_samples(datamodule)
