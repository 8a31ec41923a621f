"""The synthetic dataset written to disk in the MVTec AD layout, one marked category folder at a time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_folder, check_owned, holds_payload
from .config import DEFAULT_CONFIG, SyntheticConfig
from .defects import DEFECT_TYPES
from .sample import check_category, check_config, render_sample
from .scenes import DEMO_CATEGORIES

__all__ = ["FORMAT_VERSION", "MARKER_NAME", "check_root", "generate_category", "generate_dataset"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the rendering algorithm; bump it whenever the generated pixels change."""

MARKER_NAME = ".synthetic.json"
"""Name of the JSON marker written last into every generated category folder."""


def _marker_payload(category: str, config: SyntheticConfig) -> dict[str, object]:
    return {
        # The old module path, kept so that folders generated before the module became a package stay valid.
        "generator": "anomalib_moleflow.data.synthetic",
        "format_version": FORMAT_VERSION,
        "category": category,
        "config": asdict(config),
        "defect_types": list(DEFECT_TYPES),
    }


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_category(folder: Path, category: str, config: SyntheticConfig) -> None:
    digits = max(3, len(str(max(config.n_train, config.n_test_good, config.n_test_defect) - 1)))
    jobs: list[tuple[str, int, Path, Path | None]] = [
        ("train", config.n_train, folder / "train" / "good", None),
        ("good", config.n_test_good, folder / "test" / "good", None),
    ]
    jobs += [
        (defect, config.n_test_defect, folder / "test" / defect, folder / "ground_truth" / defect)
        for defect in DEFECT_TYPES
    ]
    for split, count, image_dir, mask_dir in jobs:
        image_dir.mkdir(parents=True, exist_ok=True)
        if mask_dir is not None:
            mask_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            _, image, mask = render_sample(category, split, index, config)
            name = f"{index:0{digits}d}"
            _save_png(image_dir / f"{name}.png", image)
            if mask_dir is not None:
                _save_png(mask_dir / f"{name}_mask.png", mask)


def check_root(root: Path | str, categories: Sequence[str]) -> None:
    """Make sure that none of the ``categories`` folders under ``root`` exists without the generator's marker.

    Raises:
        ForeignFolderError: For the first such folder (it is left untouched).
    """
    for category in categories:
        check_owned(Path(root) / category, MARKER_NAME)


def generate_category(root: Path | str, category: str, config: SyntheticConfig = DEFAULT_CONFIG) -> Path:
    """Generate one category of the synthetic dataset in the MVTec AD layout.

    The category is rendered into a temporary hidden sibling folder whose JSON marker (:data:`MARKER_NAME`, holding
    the config and :data:`FORMAT_VERSION`) is written last, then renamed to ``root/category``, so a half-written
    category never appears under its final name. If ``root/category`` already holds a marker for the same config,
    nothing is written; if its marker is for another config or an older format, it is replaced. A folder without the
    marker was not made by the generator and is never removed or overwritten.

    Args:
        root: Dataset root folder (created if missing).
        category: One of :data:`DEMO_CATEGORIES`.
        config: Dataset configuration.

    Returns:
        Path of the category folder, ``root/category``.

    Raises:
        ValueError: If the category or the config is invalid.
        ForeignFolderError: If ``root/category`` exists without the generator's marker.
    """
    check_category(category)
    check_config(config)
    target = Path(root) / category
    expected = _marker_payload(category, config)
    if holds_payload(target, MARKER_NAME, expected):
        logger.debug("Synthetic category '%s' is up to date.", target)
        return target
    logger.info("Generating synthetic category '%s'.", target)
    with atomic_folder(target, MARKER_NAME, expected) as folder:
        _write_category(folder, category, config)
    return target


def generate_dataset(
    root: Path | str, categories: Sequence[str] = DEMO_CATEGORIES, config: SyntheticConfig = DEFAULT_CONFIG
) -> Path:
    """Generate several categories of the synthetic dataset (see :func:`generate_category`).

    Args:
        root: Dataset root folder (created if missing).
        categories: Categories to generate, each one of :data:`DEMO_CATEGORIES`.
        config: Dataset configuration shared by all categories.

    Returns:
        The dataset root as a :class:`~pathlib.Path`, to be passed as ``root`` to ``anomalib.data.MVTecAD``.

    Raises:
        ValueError: If a category or the config is invalid.
        ForeignFolderError: If a category folder exists without the generator's marker.
        Both are checked before anything is written.
    """
    if isinstance(categories, str):
        categories = (categories,)
    for category in categories:
        check_category(category)
    check_config(config)
    root = Path(root)
    categories = list(dict.fromkeys(categories))
    check_root(root, categories)
    for category in categories:
        generate_category(root, category, config)
    return root
