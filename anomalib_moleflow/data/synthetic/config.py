"""Settings of a synthetic dataset: image size, sample counts and seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_CONFIG", "SyntheticConfig"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic dataset.

    Attributes:
        image_size: Side length of the square images in pixels (at least 32).
        n_train: Number of normal training images per category.
        n_test_good: Number of normal test images per category.
        n_test_defect: Number of test images per defect type and category.
        seed: Non-negative base seed; the per-category seed is derived from it and a CRC32 of the category name.
    """

    image_size: int = 128
    n_train: int = 40
    n_test_good: int = 10
    n_test_defect: int = 6  # per defect type
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate the configuration.

        Raises:
            ValueError: If a value has the wrong type or is out of range.
        """
        for name in ("image_size", "n_train", "n_test_good", "n_test_defect", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                msg = f"SyntheticConfig.{name} must be an integer, got {value!r}"
                raise ValueError(msg)
            object.__setattr__(self, name, int(value))  # numpy integers -> int (JSON marker)
        if self.image_size < 32:
            msg = f"SyntheticConfig.image_size must be >= 32, got {self.image_size}"
            raise ValueError(msg)
        for name in ("n_train", "n_test_good", "n_test_defect"):
            if getattr(self, name) < 1:
                msg = f"SyntheticConfig.{name} must be a positive integer, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.seed < 0:
            msg = f"SyntheticConfig.seed must be non-negative, got {self.seed}"
            raise ValueError(msg)


DEFAULT_CONFIG = SyntheticConfig()
