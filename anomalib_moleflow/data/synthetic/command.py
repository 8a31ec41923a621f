"""``moleflow generate-demo``: generate the offline demo dataset (the CLI builds its options from this signature)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .config import DEFAULT_CONFIG, SyntheticConfig
from .scenes import DEMO_CATEGORIES
from .writer import check_root, generate_category

logger = logging.getLogger(__name__)


def generate_demo(
    root: Path,
    categories: Sequence[str] = DEMO_CATEGORIES,
    image_size: int = DEFAULT_CONFIG.image_size,
    n_train: int = DEFAULT_CONFIG.n_train,
    n_test_good: int = DEFAULT_CONFIG.n_test_good,
    n_test_defect: int = DEFAULT_CONFIG.n_test_defect,
    seed: int = DEFAULT_CONFIG.seed,
) -> list[Path]:
    """Generate demo categories in the MVTec AD layout under ``root``.

    Every category folder under ``root`` is checked first: a folder the generator did not create is never touched.

    Args:
        root: Dataset root folder.
        categories: Categories to generate, from the demo's categories.
        image_size: Image side in pixels.
        n_train: Normal training images per category.
        n_test_good: Normal test images per category.
        n_test_defect: Test images per defect type.
        seed: Base random seed.

    Returns:
        The category folders.

    Raises:
        ValueError: On an unknown category or an invalid size or count.
        anomalib_moleflow.data.files.ForeignFolderError: If a category folder exists that the generator did not make.
    """
    unknown = [category for category in categories if category not in DEMO_CATEGORIES]
    if unknown:
        msg = f"Unknown demo categories {unknown}; choose from {list(DEMO_CATEGORIES)}."
        raise ValueError(msg)
    config = SyntheticConfig(
        image_size=image_size,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        seed=seed,
    )
    categories = list(dict.fromkeys(categories))
    check_root(root, categories)
    return [generate_category(root, category, config) for category in categories]
