"""One sample of the synthetic dataset rendered in memory: normal image, defective image and ground-truth mask."""

from __future__ import annotations

import zlib

import numpy as np

from .config import DEFAULT_CONFIG, SyntheticConfig
from .defects import DEFECT_TYPES, DEFECTS, STYLES, DefectSpec, change_mask
from .primitives import REF_SIZE, to_uint8
from .scenes import DEMO_CATEGORIES, RENDERERS

__all__ = ["check_category", "check_config", "render_sample"]

_NORMAL_SPLITS = ("train", "good")
_SIZE_CLASSES = ("small", "medium", "large")
_MIN_DEFECT_PIXELS = 3
_MAX_ATTEMPTS = 8


def check_category(category: str) -> None:
    """Raise ``ValueError`` unless ``category`` is one of :data:`DEMO_CATEGORIES`."""
    if category not in RENDERERS:
        msg = f"Unknown synthetic category {category!r}; valid categories are: {', '.join(DEMO_CATEGORIES)}"
        raise ValueError(msg)


def check_config(config: SyntheticConfig) -> None:
    """Raise ``ValueError`` unless ``config`` is a valid :class:`SyntheticConfig`."""
    if not isinstance(config, SyntheticConfig):
        msg = f"config must be a SyntheticConfig, got {type(config).__name__}"
        raise ValueError(msg)
    config.__post_init__()  # re-validate in case the frozen dataclass was tampered with


def _rng(config: SyntheticConfig, category: str, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent, platform-stable random stream for one sample (no use of Python's salted ``hash``)."""
    key = [int(config.seed), zlib.crc32(category.encode()), zlib.crc32(split.encode()), int(index), stream]
    return np.random.default_rng(key)


def render_sample(
    category: str, split: str, index: int, config: SyntheticConfig = DEFAULT_CONFIG
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample of the synthetic dataset in memory.

    The defect of a defective sample is blended into the normal rendering of the *same* sample, so ``image`` equals
    ``normal`` wherever ``mask`` is 0. Defect sizes cycle with ``index`` (small, medium, large) and every second
    defect (odd ``index``) is low-contrast.

    Args:
        category: One of :data:`DEMO_CATEGORIES`.
        split: ``"train"`` or ``"good"`` for normal train / test images, or one of :data:`DEFECT_TYPES`.
        index: Index of the sample within its split (non-negative).
        config: Dataset configuration (image size and seed are used).

    Returns:
        ``(normal, image, mask)``: the normal rendering and the written image, both ``uint8`` arrays of shape
        ``(H, W, 3)``, and the ground-truth mask, a ``uint8`` array of shape ``(H, W)`` with values 0 or 255 (all 0
        for normal splits).

    Raises:
        ValueError: If the category, split, index or config is invalid.
        RuntimeError: If no visible defect could be produced (should not happen).
    """
    check_category(category)
    check_config(config)
    if split not in _NORMAL_SPLITS and split not in DEFECTS:
        msg = f"Unknown split {split!r}; expected one of {', '.join(_NORMAL_SPLITS + DEFECT_TYPES)}"
        raise ValueError(msg)
    if index < 0:
        msg = f"index must be non-negative, got {index}"
        raise ValueError(msg)
    size = config.image_size
    rng = _rng(config, category, split, index, 0)
    scene = RENDERERS[category](rng, size)
    noise = rng.normal(0.0, 0.006, (size, size, 3)).astype(np.float32)
    noise += rng.normal(0.0, 0.006, (size, size, 1)).astype(np.float32)
    normal = to_uint8(scene.image + noise)
    if split in _NORMAL_SPLITS:
        return normal, normal.copy(), np.zeros((size, size), np.uint8)

    defect_rng = _rng(config, category, split, index, 1)
    style = STYLES[category]
    for attempt in range(_MAX_ATTEMPTS):
        spec = DefectSpec(
            size_class=_SIZE_CLASSES[index % len(_SIZE_CLASSES)],
            subtle=index % 2 == 1 and attempt < _MAX_ATTEMPTS // 2,
            scale=size / REF_SIZE,
            boost=1.0 + 0.25 * attempt,
        )
        defective = to_uint8(DEFECTS[split](defect_rng, scene, style, spec) + noise)
        mask = change_mask(normal, defective)
        if int(mask.sum()) >= _MIN_DEFECT_PIXELS:
            image = np.where(mask[..., None], defective, normal)
            return normal, image, mask.astype(np.uint8) * np.uint8(255)
    msg = f"could not render a visible {split!r} defect for {category!r} sample {index}"
    raise RuntimeError(msg)
