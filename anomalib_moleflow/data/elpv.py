"""ELPV solar-cell images (PyPI ``elpv-dataset``) as anomalib ``Folder`` datamodules, one per cell type.

The ``elpv-dataset`` package ships 2,624 electroluminescence images of solar cells (300 x 300, 8-bit grayscale) and a
``labels.csv`` with, per image, its path, the probability that the cell is defective (0, 1/3, 2/3 or 1) and its type
(``mono`` or ``poly``). For anomaly detection, probability 0 is *good* and probability >= 2/3 is *defective*; the
uncertain cells (1/3) are left out. Labels are image-level only: there are no masks, so pixel metrics are skipped.

:meth:`ELPV.prepare_data` writes the chosen images (copies) into anomalib's folder layout, deterministically from
``split_seed``, atomically (a temporary folder renamed at the end) and only when the layout is missing or was written
by this module with other settings; a folder this module did not write is never replaced::

    ROOT/CATEGORY/train/good/cellNNNN.png
    ROOT/CATEGORY/test/good/cellNNNN.png
    ROOT/CATEGORY/test/defect/cellNNNN.png

Example:
    >>> from anomalib_moleflow.data.elpv import ELPV
    >>> datamodule = ELPV(root="./datasets/elpv", category="mono", n_train=60, n_test_good=20, n_test_defect=20)
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anomalib.data import Folder

from .checks import DatasetError
from .files import atomic_folder, holds_payload

__all__ = ["ELPV", "ELPV_CATEGORIES", "ElpvSplit", "elpv_data_dir", "read_labels", "write_elpv_category"]

#: Cell types in ``labels.csv``.
ELPV_CATEGORIES: tuple[str, ...] = ("mono", "poly")
MARKER_NAME = ".elpv.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ElpvSplit:
    """How one cell type is split into train/test.

    Attributes:
        n_train: Good images for training (``None``: every good image not used for testing).
        n_test_good: Good images for testing (``None``: 20 % of the good images).
        n_test_defect: Defective images for testing (``None``: all of them).
        split_seed: Seed of the shuffle that picks the images.
        good_max_probability: Cells with a defect probability <= this are good.
        defect_min_probability: Cells with a defect probability >= this are defective.
    """

    n_train: int | None = None
    n_test_good: int | None = None
    n_test_defect: int | None = None
    split_seed: int = 0
    good_max_probability: float = 0.0
    defect_min_probability: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        """Validate the counts and thresholds."""
        for name in ("n_train", "n_test_good", "n_test_defect"):
            value = getattr(self, name)
            if value is not None and value < 1:
                msg = f"ELPV {name} must be a positive integer or None, got {value}."
                raise ValueError(msg)
        if not self.good_max_probability < self.defect_min_probability:
            msg = "ELPV good_max_probability must be below defect_min_probability."
            raise ValueError(msg)


def elpv_data_dir() -> Path:
    """Folder of the installed ``elpv-dataset`` package's data (``labels.csv`` and ``images/``).

    Raises:
        DatasetError: If the package is not installed.
    """
    try:
        import elpv_dataset
    except ImportError as error:
        msg = (
            "The ELPV images come from the PyPI package 'elpv-dataset', which is not installed. Install it with "
            "`pip install elpv-dataset` (or `pip install 'anomalib-moleflow[elpv]'`)."
        )
        raise DatasetError(msg) from error
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def read_labels(source: Path | None = None) -> list[tuple[str, float, str]]:
    """Rows ``(relative image path, defect probability, cell type)`` of ``labels.csv``."""
    source = Path(source) if source is not None else elpv_data_dir()
    labels = source / "labels.csv"
    if not labels.is_file():
        msg = f"'{labels}' not found: point `source` at the data folder of the elpv-dataset package."
        raise DatasetError(msg)
    rows = []
    for line in labels.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def _pick(paths: list[str], count: int | None, rng: np.random.Generator) -> list[str]:
    order = rng.permutation(len(paths))
    chosen = [paths[i] for i in order]
    return chosen if count is None else chosen[:count]


def _plan(category: str, split: ElpvSplit, source: Path) -> dict[str, list[str]]:
    """Relative image paths of each output folder."""
    rows = [row for row in read_labels(source) if row[2] == category]
    good = sorted(path for path, probability, _ in rows if probability <= split.good_max_probability)
    defect = sorted(path for path, probability, _ in rows if probability >= split.defect_min_probability)
    rng = np.random.default_rng([split.split_seed, ELPV_CATEGORIES.index(category)])
    good = _pick(good, None, rng)
    n_test_good = split.n_test_good if split.n_test_good is not None else max(1, len(good) // 5)
    n_train = split.n_train if split.n_train is not None else len(good) - n_test_good
    if n_train + n_test_good > len(good):
        msg = f"ELPV '{category}' has {len(good)} good cells; {n_train} train + {n_test_good} test good requested."
        raise ValueError(msg)
    defects = _pick(defect, split.n_test_defect, rng)
    if split.n_test_defect is not None and len(defects) < split.n_test_defect:
        msg = f"ELPV '{category}' has {len(defects)} defective cells; {split.n_test_defect} requested."
        raise ValueError(msg)
    return {
        "train/good": sorted(good[:n_train]),
        "test/good": sorted(good[n_train : n_train + n_test_good]),
        "test/defect": sorted(defects),
    }


def write_elpv_category(root: Path | str, category: str, split: ElpvSplit, source: Path | None = None) -> Path:
    """Write one cell type in the folder layout (idempotent; atomic rename of a complete temporary folder).

    Args:
        root: Dataset root folder (created if missing).
        category: ``"mono"`` or ``"poly"``.
        split: How the cells are split into train/test.
        source: Data folder with ``labels.csv`` (default: the installed package's).

    Returns:
        The category folder ``root/category``.

    Raises:
        ValueError: If the category is unknown or the split asks for more cells than there are.
        DatasetError: If the labels are missing.
        ForeignFolderError: If ``root/category`` exists but was not written by this function (it is left untouched).
    """
    if category not in ELPV_CATEGORIES:
        msg = f"Unknown ELPV category '{category}'; valid: {ELPV_CATEGORIES}."
        raise ValueError(msg)
    source = Path(source) if source is not None else elpv_data_dir()
    target = Path(root) / category
    expected = {"format_version": FORMAT_VERSION, "category": category, "split": asdict(split)}
    if holds_payload(target, MARKER_NAME, expected):
        return target
    plan = _plan(category, split, source)
    with atomic_folder(target, MARKER_NAME, expected) as tmp:
        for folder, paths in plan.items():
            (tmp / folder).mkdir(parents=True)
            for path in paths:
                shutil.copyfile(source / path, tmp / folder / Path(path).name)
    return target


class ELPV(Folder):
    """anomalib ``Folder`` datamodule over one ELPV cell type, written from the ``elpv-dataset`` package.

    Args:
        root: Where the folder layout is written.
        category: ``"mono"`` (monocrystalline) or ``"poly"`` (polycrystalline).
        n_train: Good training images (``None``: all good images not used for testing).
        n_test_good: Good test images (``None``: 20 % of the good images).
        n_test_defect: Defective test images (``None``: all).
        split_seed: Seed of the deterministic train/test split and subsampling.
        good_max_probability: Defect probability up to which a cell is good.
        defect_min_probability: Defect probability from which a cell is defective.
        source: Data folder with ``labels.csv`` (default: the installed package's).
        **kwargs: Passed to ``Folder`` (batch sizes, workers, ``val_split_mode`` ...).
    """

    #: The data is written by ``prepare_data``: nothing to check on disk beforehand.
    generates_data = True

    def __init__(
        self,
        root: Path | str = "./datasets/elpv",
        category: Literal["mono", "poly"] = "mono",
        n_train: int | None = None,
        n_test_good: int | None = None,
        n_test_defect: int | None = None,
        split_seed: int = 0,
        good_max_probability: float = 0.0,
        defect_min_probability: float = 2.0 / 3.0,
        source: Path | str | None = None,
        **kwargs: Any,
    ) -> None:
        if category not in ELPV_CATEGORIES:
            msg = f"Unknown ELPV category '{category}'; valid: {ELPV_CATEGORIES}."
            raise ValueError(msg)
        kwargs.setdefault("val_split_mode", "same_as_test")  # like MVTecAD: thresholds from the test images
        kwargs.setdefault("extensions", (".png",))
        super().__init__(
            name=f"elpv_{category}",
            root=Path(root) / category,
            normal_dir="train/good",
            normal_test_dir="test/good",
            abnormal_dir="test/defect",
            **kwargs,
        )
        self.data_root = Path(root)
        self.category = category
        self.split = ElpvSplit(
            n_train=n_train,
            n_test_good=n_test_good,
            n_test_defect=n_test_defect,
            split_seed=split_seed,
            good_max_probability=good_max_probability,
            defect_min_probability=defect_min_probability,
        )
        self.source = Path(source) if source is not None else None

    def prepare_data(self) -> None:
        """Write the folder layout from the package data if it is not there yet (never downloads)."""
        write_elpv_category(self.data_root, self.category, self.split, self.source)
