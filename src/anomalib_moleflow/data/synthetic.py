"""Procedural MVTec-AD-style anomaly detection dataset used as the project's offline demo.

No real dataset can be downloaded in the demo environment, so this module renders a small but realistic stand-in with
exactly the `MVTec AD <https://www.mvtec.com/company/research/datasets/mvtec-ad>`_ folder layout, loadable by
``anomalib.data.MVTecAD(root=ROOT, category=CATEGORY)``::

    ROOT/CATEGORY/train/good/000.png
    ROOT/CATEGORY/test/good/000.png
    ROOT/CATEGORY/test/<defect_type>/000.png
    ROOT/CATEGORY/ground_truth/<defect_type>/000_mask.png   (single channel, 0 / 255)

Every normal image is a random variation of its category (phase, orientation, position, scale, lighting, sensor
noise). Defects come in three sizes (cycled with the sample index, from about 0.05 % to 5 % of the image) and half of
them are low-contrast. They are alpha-blended into the normal rendering of the same sample, and the ground-truth mask is
the set of pixels whose 8-bit value changed (closed by a 3x3 structuring element and hole-filled), so that outside the
mask a defective image is byte-identical to the normal image of the same sample.

Example:
    >>> from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset
    >>> root = generate_dataset("./datasets/synthetic", config=SyntheticConfig(image_size=128))  # doctest: +SKIP

The module can also be run as a script: ``python -m anomalib_moleflow.data.synthetic ./datasets/synthetic``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFAULT_CONFIG",
    "DEFECT_TYPES",
    "DEMO_CATEGORIES",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "OBJECT_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "SyntheticConfig",
    "generate_category",
    "generate_dataset",
    "main",
    "render_sample",
]

FORMAT_VERSION = 1
"""Version of the rendering algorithm; bump it whenever the generated pixels change."""

MARKER_NAME = ".synthetic.json"
"""Name of the JSON marker written last into every generated category folder."""

TEXTURE_CATEGORIES: tuple[str, ...] = ("woven", "wood", "marble")
OBJECT_CATEGORIES: tuple[str, ...] = ("pill", "screw")
DEMO_CATEGORIES: tuple[str, ...] = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "contamination", "color")

_NORMAL_SPLITS = ("train", "good")
_SIZE_CLASSES = ("small", "medium", "large")
_REF_SIZE = 128.0  # all geometric constants below are expressed in pixels at this image size
_MIN_CHANGE = 2  # an 8-bit change of at least this many levels marks a pixel as anomalous
_MIN_DEFECT_PIXELS = 3
_MAX_ATTEMPTS = 8

Array = np.ndarray
RGB = tuple[float, float, float]


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


# ----------------------------------------------------------------------------------------------------------------------
# Small numerical helpers
# ----------------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    """Return read-only ``(yy, xx)`` pixel-centre coordinate grids of shape ``(size, size)``."""
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _local_coords(size: int, cx: float, cy: float, angle: float) -> tuple[Array, Array]:
    """Coordinates ``(u, v)`` in pixels around ``(cx, cy)``; ``u`` runs along the direction ``angle``."""
    yy, xx = _grid(size)
    dx = xx - np.float32(cx)
    dy = yy - np.float32(cy)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return dx * c + dy * s, dy * c - dx * s


def _smoothstep(edge0: float, edge1: float, x: Array) -> Array:
    t = np.clip((x - np.float32(edge0)) / np.float32(edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@lru_cache(maxsize=64)
def _gaussian_transfer(size: int, sigma: float) -> Array:
    """Fourier transfer function of a periodic Gaussian blur of standard deviation ``sigma`` pixels."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * sigma**2 * (fx * fx + fy * fy))
    transfer.setflags(write=False)
    return transfer


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> Array:
    """Periodic Gaussian-filtered white noise with unit standard deviation (filtered in the Fourier domain)."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    transfer = _gaussian_transfer(size, round(max(sigma, 0.3), 4))
    field = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size)).astype(np.float32)
    std = float(field.std())
    return field / np.float32(std) if std > 1e-8 else field


def _fractal_noise(rng: np.random.Generator, size: int, sigma: float, octaves: int = 4) -> Array:
    """Sum of smooth noise octaves (halving sigma, persistence 0.5), unit-ish standard deviation."""
    total = np.zeros((size, size), dtype=np.float32)
    amp, norm = 1.0, 0.0
    for _ in range(octaves):
        total += np.float32(amp) * _smooth_noise(rng, size, sigma)
        norm += amp * amp
        amp *= 0.5
        sigma *= 0.5
    return total / np.float32(np.sqrt(norm))


def _illumination(rng: np.random.Generator, size: int, strength: float) -> Array:
    """Multiplicative linear illumination gradient around 1."""
    yy, xx = _grid(size)
    gx, gy = rng.normal(0.0, strength, 2)
    return 1.0 + np.float32(gx) * (xx / size - 0.5) + np.float32(gy) * (yy / size - 0.5)


def _vignette(size: int, strength: float) -> Array:
    yy, xx = _grid(size)
    r2 = ((xx / size - 0.5) ** 2 + (yy / size - 0.5) ** 2) * 2.0
    return 1.0 - np.float32(strength) * r2


def _jitter_colour(rng: np.random.Generator, colour: RGB, amount: float) -> Array:
    """Random brightness change of relative size ``amount`` and a four times smaller change of hue."""
    factor = (1.0 + rng.normal(0.0, amount)) * (1.0 + rng.normal(0.0, amount / 4, 3))
    return np.clip(np.asarray(colour, dtype=np.float32) * factor, 0.0, 1.0).astype(np.float32)


def _light_direction(rng: np.random.Generator) -> Array:
    """Unit vector towards a light in the upper left (x right, y down, z towards the camera)."""
    light = np.array([-0.45 + rng.normal(0, 0.06), -0.55 + rng.normal(0, 0.06), 0.7], dtype=np.float32)
    return light / np.float32(np.linalg.norm(light))


def _drop_shadow(alpha: Array, size: int, strength: float) -> Array:
    """Multiplicative darkening of the background by a blurred, offset copy of the object's coverage."""
    s = size / _REF_SIZE
    shift = max(1, round(3 * s))
    shadow = ndimage.gaussian_filter(np.roll(alpha, (shift, shift), axis=(0, 1)), 3.0 * s)
    return 1.0 - np.float32(strength) * shadow


def _to_uint8(image: Array) -> Array:
    return np.clip(np.rint(image * np.float32(255.0)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Normal scenes
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Scene:
    """A rendered normal sample before sensor noise.

    Attributes:
        image: Float32 RGB image of shape ``(H, W, 3)`` with values in about ``[0, 1]``.
        support: Float32 map of shape ``(H, W)`` in ``[0, 1]``: where defects may appear (the object for objects).
        light: Unit 3-vector pointing towards the light.
        axis: Preferred direction of scratches (long axis of an object) in radians, or ``None``.
    """

    image: Array
    support: Array
    light: Array
    axis: float | None = None


def _render_woven(rng: np.random.Generator, size: int) -> _Scene:
    """Plain-weave fabric: indigo warp threads interlaced with light weft threads."""
    s = size / _REF_SIZE
    period = 8.0 * s * rng.uniform(0.96, 1.04)
    u, v = _local_coords(size, rng.uniform(0, size), rng.uniform(0, size), np.deg2rad(rng.normal(0.0, 1.5)))
    u = u + np.float32(0.1 * period) * _smooth_noise(rng, size, 12.0 * s)
    v = v + np.float32(0.1 * period) * _smooth_noise(rng, size, 12.0 * s)
    cu, cv = u / np.float32(period), v / np.float32(period)
    iu, iv = np.floor(cu), np.floor(cv)
    fu, fv = cu - iu, cv - iv
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    over = (iu + iv) % 2 == 0  # warp on top
    twist_u = 0.9 + 0.1 * np.sin(2.0 * np.pi * (2.5 * fv + 0.8 * fu))  # twisted yarn
    twist_v = 0.9 + 0.1 * np.sin(2.0 * np.pi * (2.5 * fu + 0.8 * fv))
    warp_h = np.sqrt(np.sin(np.pi * fu)) * (0.6 + 0.4 * np.sin(np.pi * fv)) * twist_u
    weft_h = np.sqrt(np.sin(np.pi * fv)) * (0.6 + 0.4 * np.sin(np.pi * fu)) * twist_v
    height = np.where(over, warp_h, weft_h)
    n_tab = 61
    warp_tone = (1.0 + rng.normal(0.0, 0.05, n_tab)).astype(np.float32)
    weft_tone = (1.0 + rng.normal(0.0, 0.05, n_tab)).astype(np.float32)
    tone = np.where(over, warp_tone[iu % n_tab], weft_tone[iv % n_tab])
    fuzz = _smooth_noise(rng, size, 0.7 * s)
    lum = (0.28 + 0.72 * height) * tone * (1.0 + 0.06 * fuzz)
    warp_col = _jitter_colour(rng, (0.24, 0.32, 0.50), 0.03)
    weft_col = _jitter_colour(rng, (0.66, 0.66, 0.68), 0.03)
    image = lum[..., None] * np.where(over[..., None], warp_col, weft_col)
    shading = _illumination(rng, size, 0.15) * (1.0 + 0.04 * _fractal_noise(rng, size, 24.0 * s, 3))
    image = image * shading[..., None]
    return _Scene(image.astype(np.float32), np.ones((size, size), np.float32), _light_direction(rng))


def _render_wood(rng: np.random.Generator, size: int) -> _Scene:
    """Planed wood: growth rings with cathedral arches, fibres following the grain."""
    s = size / _REF_SIZE
    u, v = _local_coords(size, size / 2, size / 2, np.deg2rad(rng.normal(0.0, 3.0)))
    curvature = rng.uniform(-1.0, 1.0) * 0.5 / size
    v0 = rng.uniform(-0.8, 0.8) * size
    t = (
        u
        + np.float32(curvature) * (v - np.float32(v0)) ** 2
        + np.float32(2.0 * s) * _fractal_noise(rng, size, 32 * s, 3)
    )
    t = t + np.float32(rng.uniform(0, 100) * s)
    period = 10.0 * s * rng.uniform(0.85, 1.15)
    phase = t / np.float32(period) + 0.15 * _smooth_noise(rng, size, 30.0 * s)
    ring = 0.5 + 0.5 * np.cos(2.0 * np.pi * phase)
    late = ring**6 * np.clip(0.8 + 0.25 * _smooth_noise(rng, size, 16.0 * s), 0.3, 1.2)
    table = ndimage.gaussian_filter1d(rng.standard_normal(512).astype(np.float32), 0.8, mode="wrap")
    table /= np.float32(table.std())
    fibres = np.interp((t / np.float32(0.8 * s)).ravel() % 512, np.arange(512), table).reshape(t.shape)
    tone = np.clip(0.55 * late + 0.18 * ring + 0.05 * fibres, 0.0, 1.0).astype(np.float32)
    light_col = _jitter_colour(rng, (0.80, 0.62, 0.42), 0.03)
    dark_col = _jitter_colour(rng, (0.50, 0.32, 0.17), 0.03)
    image = light_col * (1.0 - tone[..., None]) + dark_col * tone[..., None]
    image = image * (1.0 + 0.06 * fibres.astype(np.float32))[..., None]
    image = image * _illumination(rng, size, 0.15)[..., None]
    return _Scene(image.astype(np.float32), np.ones((size, size), np.float32), _light_direction(rng))


def _render_marble(rng: np.random.Generator, size: int) -> _Scene:
    """Polished marble: cloudy cream base with a few long turbulent grey-green veins and thin cracks."""
    s = size / _REF_SIZE
    u, v = _local_coords(size, size / 2, size / 2, np.deg2rad(35.0 + rng.normal(0.0, 12.0)))
    turbulence = _fractal_noise(rng, size, 22 * s, 3)
    phase = u / np.float32(0.45 * size) + 0.45 * turbulence + np.float32(rng.uniform(0, 1))
    sine = np.abs(np.sin(np.pi * phase))
    fade = np.clip(0.55 + 0.6 * _smooth_noise(rng, size, 14 * s), 0.0, 1.0)
    vein = (np.exp(-sine / 0.07) + 0.25 * np.exp(-sine / 0.45)) * fade
    phase2 = v / np.float32(0.3 * size) + 0.8 * _fractal_noise(rng, size, 12 * s, 3) + np.float32(rng.uniform(0, 1))
    crack = np.exp(-np.abs(np.sin(np.pi * phase2)) / 0.03) * np.clip(_smooth_noise(rng, size, 10 * s), 0.0, 1.0)
    cloud = _fractal_noise(rng, size, 28 * s, 4)
    base = _jitter_colour(rng, (0.89, 0.88, 0.84), 0.015) * (1.0 + 0.04 * cloud)[..., None]
    vein_col = _jitter_colour(rng, (0.42, 0.47, 0.45), 0.03)
    amount = np.clip(0.7 * vein + 0.3 * crack, 0.0, 0.85)[..., None]
    image = base * (1.0 - amount) + vein_col * amount
    image = image * _illumination(rng, size, 0.1)[..., None]
    return _Scene(image.astype(np.float32), np.ones((size, size), np.float32), _light_direction(rng))


def _render_pill(rng: np.random.Generator, size: int) -> _Scene:
    """A white capsule-shaped tablet with red speckles and a score line on a dark background."""
    s = size / _REF_SIZE
    scale = rng.uniform(0.96, 1.04)
    half_len, radius = 0.36 * size * scale, 0.18 * size * scale
    cx, cy = size / 2 + rng.normal(0, 0.012 * size), size / 2 + rng.normal(0, 0.012 * size)
    angle = np.deg2rad(rng.normal(0.0, 3.0))
    u, v = _local_coords(size, cx, cy, angle)
    du = np.maximum(np.abs(u) - np.float32(half_len - radius), 0.0)
    dist = np.sqrt(du * du + v * v) - np.float32(radius)  # signed distance in pixels, negative inside
    alpha = np.clip(0.5 - dist, 0.0, 1.0)
    inner = np.clip(-dist / np.float32(radius), 0.0, 1.0)
    height = np.sqrt(inner * (2.0 - inner)) * np.float32(0.45 * radius)
    gy, gx = np.gradient(height)
    normal = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = _light_direction(rng)
    half = (light + np.array([0, 0, 1], np.float32)) / np.float32(np.linalg.norm(light + np.array([0, 0, 1])))
    lambert = np.clip(normal @ light, 0.0, 1.0)
    spec = np.clip(normal @ half, 0.0, 1.0) ** 30

    albedo = np.broadcast_to(_jitter_colour(rng, (0.93, 0.90, 0.83), 0.015), (size, size, 3))
    spots = np.zeros((size, size), np.float32)
    candidates = np.flatnonzero(dist < -2.5 * s - 1.0)
    n_spots = int(rng.integers(8, 20))
    spots.flat[rng.choice(candidates, n_spots)] = rng.uniform(0.5, 1.0, n_spots)
    sigma = max(0.55, 0.75 * s)
    spots = np.clip(ndimage.gaussian_filter(spots, sigma) * np.float32(2 * np.pi * sigma * sigma), 0, 0.9)[..., None]
    albedo = albedo * (1.0 - spots) + _jitter_colour(rng, (0.70, 0.30, 0.22), 0.05) * spots
    groove = np.exp(-(((u - np.float32(rng.normal(0, 0.3))) / np.float32(0.8 * s + 0.3)) ** 2)) * (inner > 0.08)
    albedo = albedo * (1.0 - 0.22 * groove.astype(np.float32))[..., None]
    albedo = albedo * (1.0 + 0.02 * _smooth_noise(rng, size, 1.0 * s))[..., None]
    pill = albedo * (0.3 + 0.8 * lambert)[..., None] + 0.3 * spec[..., None]

    bg_col = _jitter_colour(rng, (0.10, 0.10, 0.11), 0.05)
    background = bg_col * (1.0 + 0.15 * _fractal_noise(rng, size, 20 * s, 3))[..., None]
    background = background * (_vignette(size, 0.4) * _drop_shadow(alpha, size, 0.6))[..., None]
    image = background * (1.0 - alpha[..., None]) + pill * alpha[..., None]
    image = image * _illumination(rng, size, 0.08)[..., None]
    support = np.clip(-dist - 1.0, 0.0, 1.0)
    return _Scene(image.astype(np.float32), support.astype(np.float32), light, float(angle))


def _render_screw(rng: np.random.Generator, size: int) -> _Scene:
    """A metal screw (side view: head, shank, helical thread, tip) lying on a light background."""
    scale = size * rng.uniform(0.96, 1.04)
    cx, cy = size / 2 + rng.normal(0, 0.015 * size), size / 2 + rng.normal(0, 0.015 * size)
    angle = np.deg2rad(-25.0 + rng.normal(0.0, 5.0))
    u, v = _local_coords(size, cx, cy, angle)
    head_u0, head_u1, head_r, corner = -0.40 * scale, -0.29 * scale, 0.12 * scale, 0.025 * scale
    shaft_r, amp, pitch = 0.052 * scale, 0.013 * scale, 0.036 * scale * rng.uniform(0.97, 1.03)
    thread_start, tip_start, tip_end = -0.17 * scale, 0.28 * scale, 0.41 * scale

    qx = np.abs(u - np.float32((head_u0 + head_u1) / 2)) - np.float32((head_u1 - head_u0) / 2 - corner)
    qy = np.abs(v) - np.float32(head_r - corner)
    d_head = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - np.float32(corner)

    phase = (u + 0.45 * v) / np.float32(pitch) + np.float32(rng.uniform(0, 1))
    frac = phase - np.floor(phase)
    crest = 1.0 - 2.0 * np.abs(frac - 0.5)  # 1 on the crest of the thread, 0 in the root
    threaded = _smoothstep(thread_start, thread_start + pitch, u)
    taper = np.clip((np.float32(tip_end) - u) / np.float32(tip_end - tip_start), 0.0, 1.0)
    radius = (np.float32(shaft_r) + np.float32(amp) * (2.0 * crest - 1.0) * threaded) * taper
    d_shaft = np.maximum(np.abs(v) - radius, np.maximum(np.float32(head_u1 - 1.0) - u, u - np.float32(tip_end)))
    dist = np.minimum(d_head, d_shaft)
    alpha = np.clip(0.5 - dist, 0.0, 1.0)

    in_head = d_head < d_shaft
    across = np.clip(np.where(in_head, v / np.float32(head_r), v / np.maximum(radius, 0.5)), -1.0, 1.0)
    flank = np.where(in_head, 0.0, np.sign(frac - 0.5) * 0.7 * threaded)
    head_edge = np.where(in_head, np.clip((np.abs(u - np.float32(head_u0 + corner)) - corner) / corner, -1, 0), 0.0)
    normal = np.stack([flank + head_edge, across, np.sqrt(1.0 - across * across) + 0.05], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = _light_direction(rng)
    c, s = np.cos(angle), np.sin(angle)
    light_local = np.array([light[0] * c + light[1] * s, light[1] * c - light[0] * s, light[2]], np.float32)
    half = light_local + np.array([0, 0, 1], np.float32)
    half /= np.float32(np.linalg.norm(half))
    lambert = np.clip(normal @ light_local, 0.0, 1.0)
    spec = np.clip(normal @ half, 0.0, 1.0) ** 20
    metal_col = _jitter_colour(rng, (0.52, 0.53, 0.55), 0.02)
    grooves = np.where(in_head, 1.0, 0.72 + 0.28 * (crest * threaded + (1.0 - threaded)))
    brushed = 1.0 + 0.03 * _smooth_noise(rng, size, 0.8 * size / _REF_SIZE)
    metal = metal_col * ((0.25 + 0.8 * lambert) * grooves * brushed)[..., None] + 0.45 * spec[..., None]

    s_rel = size / _REF_SIZE
    bg_col = _jitter_colour(rng, (0.80, 0.80, 0.77), 0.02)
    background = bg_col * (1.0 + 0.025 * _fractal_noise(rng, size, 20 * s_rel, 3))[..., None]
    background = background * (_vignette(size, 0.25) * _drop_shadow(alpha, size, 0.45))[..., None]
    image = background * (1.0 - alpha[..., None]) + metal * alpha[..., None]
    image = image * _illumination(rng, size, 0.08)[..., None]
    support = np.clip(-dist - 0.8, 0.0, 1.0)
    return _Scene(image.astype(np.float32), support.astype(np.float32), light, float(angle))


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "woven": _render_woven,
    "wood": _render_wood,
    "marble": _render_marble,
    "pill": _render_pill,
    "screw": _render_screw,
}


# ----------------------------------------------------------------------------------------------------------------------
# Defects
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Style:
    """Category-specific appearance of defects.

    Attributes:
        bright_scratch: Probability that a scratch is lighter (rather than darker) than the surface.
        stains: Colours of contamination.
        hole: Colour seen inside a hole / pit.
        rim: Whether holes have a raised, lighter rim.
        hair: Probability that a contamination is a thin fibre instead of a blob.
    """

    bright_scratch: float
    stains: tuple[RGB, ...]
    hole: RGB
    rim: bool
    hair: float


_STYLES: dict[str, _Style] = {
    "woven": _Style(
        0.6,
        ((0.30, 0.20, 0.12), (0.08, 0.08, 0.08), (0.62, 0.32, 0.15), (0.86, 0.82, 0.66)),
        (0.04, 0.04, 0.05),
        rim=False,
        hair=0.35,
    ),
    "wood": _Style(
        0.7, ((0.16, 0.10, 0.07), (0.35, 0.40, 0.30), (0.88, 0.87, 0.84)), (0.20, 0.12, 0.06), rim=True, hair=0.2
    ),
    "marble": _Style(
        0.3, ((0.55, 0.40, 0.25), (0.20, 0.20, 0.22), (0.66, 0.55, 0.28)), (0.45, 0.43, 0.40), rim=True, hair=0.25
    ),
    "pill": _Style(
        0.2, ((0.32, 0.23, 0.15), (0.12, 0.12, 0.12), (0.70, 0.58, 0.32)), (0.55, 0.50, 0.42), rim=False, hair=0.0
    ),
    "screw": _Style(
        0.75, ((0.45, 0.25, 0.12), (0.08, 0.08, 0.08), (0.88, 0.88, 0.84)), (0.14, 0.14, 0.15), rim=True, hair=0.0
    ),
}


@dataclass(frozen=True)
class _DefectSpec:
    """Random draws shared by all defect types for one sample."""

    size_class: str
    subtle: bool
    scale: float  # image_size / 128
    boost: float  # > 1 on retries after an invisible defect


def _pick_centre(rng: np.random.Generator, support: Array, margin: float) -> tuple[float, float]:
    """Random point (x, y) inside ``support`` at least ``margin`` pixels from its border when possible."""
    inside = np.pad(support > 0.99, 1)
    depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
    candidates = np.flatnonzero(depth >= margin)
    if candidates.size == 0:
        candidates = np.flatnonzero(depth >= 0.7 * depth.max())
    y, x = np.unravel_index(rng.choice(candidates), support.shape)
    jitter = rng.uniform(-0.5, 0.5, 2)
    return float(x + 0.5 + jitter[0]), float(y + 0.5 + jitter[1])


def _polar_shape(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, roughness: float, harmonics: int
) -> Array:
    """Approximate signed distance (pixels, negative inside) to an irregular, elongated blob."""
    aspect = rng.uniform(1.0, 1.6)
    u, v = _local_coords(size, centre[0], centre[1], rng.uniform(0, np.pi))
    u = u / np.float32(np.sqrt(aspect))
    v = v * np.float32(np.sqrt(aspect))
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    wobble = np.ones_like(rho)
    for k in range(2, harmonics + 1):
        wobble += np.float32(rng.normal(0.0, roughness / np.sqrt(k))) * np.cos(
            k * theta + np.float32(rng.uniform(0, 7))
        )
    return rho - np.float32(radius) * np.clip(wobble, 0.4, 1.8)


def _curve_alpha(
    rng: np.random.Generator, size: int, centre: tuple[float, float], angle: float, length: float, width: float
) -> Array:
    """Anti-aliased coverage of a thin, slightly bent stroke with varying pressure along its length."""
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    c = np.asarray(centre)
    p0, p2 = c - direction * length / 2, c + direction * length / 2
    p1 = c + normal * length * rng.normal(0.0, 0.15)
    n = max(8, int(2 * length))
    t = np.linspace(0.0, 1.0, n)[:, None]
    points = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.float32)
    pressure = ndimage.gaussian_filter1d(rng.standard_normal(n), max(1.0, n / 6))
    pressure = np.clip(0.7 + 0.3 * pressure / max(float(np.abs(pressure).max()), 1e-6), 0.2, 1.0)
    pressure = (pressure * np.sin(np.pi * t[:, 0]) ** 0.3).astype(np.float32)

    pad = width + 2
    x0, x1 = int(max(0, np.floor(points[:, 0].min() - pad))), int(min(size, np.ceil(points[:, 0].max() + pad)))
    y0, y1 = int(max(0, np.floor(points[:, 1].min() - pad))), int(min(size, np.ceil(points[:, 1].max() + pad)))
    alpha = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5
    d2 = (xs[None, :, None] - points[None, None, :, 0]) ** 2 + (ys[:, None, None] - points[None, None, :, 1]) ** 2
    nearest = np.argmin(d2, axis=-1)
    dist = np.sqrt(np.take_along_axis(d2, nearest[..., None], axis=-1)[..., 0])
    alpha[y0:y1, x0:x1] = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0) * pressure[nearest]
    return alpha


def _strength(
    rng: np.random.Generator, spec: _DefectSpec, normal: tuple[float, float], subtle: tuple[float, float]
) -> float:
    low, high = subtle if spec.subtle else normal
    return float(min(1.0, rng.uniform(low, high) * spec.boost))


def _blend(image: Array, alpha: Array, target: Array) -> Array:
    a = alpha[..., None]
    return image * (1.0 - a) + target * a


def _scratch(rng: np.random.Generator, scene: _Scene, style: _Style, spec: _DefectSpec) -> Array:
    lengths = {"small": (7, 14), "medium": (16, 30), "large": (32, 56)}[spec.size_class]
    widths = {"small": (1.0, 1.6), "medium": (1.2, 2.2), "large": (1.6, 3.0)}[spec.size_class]
    length = rng.uniform(*lengths) * spec.scale
    width = max(1.0, rng.uniform(*widths) * spec.scale)
    size = scene.image.shape[0]
    angle = rng.uniform(0, np.pi) if scene.axis is None else scene.axis + rng.normal(0.0, np.deg2rad(8))
    centre = _pick_centre(rng, scene.support, 2.0 if scene.axis is not None else length / 2)
    alpha = _curve_alpha(rng, size, centre, angle, length, width) * scene.support
    strength = _strength(rng, spec, (0.65, 1.0), (0.22, 0.4))
    image = scene.image
    target = image + (1.0 - image) * 0.6 if rng.random() < style.bright_scratch else image * 0.35
    return _blend(image, alpha * np.float32(strength), target)


def _hole(rng: np.random.Generator, scene: _Scene, style: _Style, spec: _DefectSpec) -> Array:
    radii = {"small": (2.0, 3.5), "medium": (4.0, 6.5), "large": (7.0, 10.0)}[spec.size_class]
    radius = max(1.5, rng.uniform(*radii) * spec.scale)
    size = scene.image.shape[0]
    centre = _pick_centre(rng, scene.support, radius + 2.0)
    dist = _polar_shape(rng, size, centre, radius, 0.12, 4)
    inside = np.clip(0.5 - dist, 0.0, 1.0) * scene.support
    yy, xx = _grid(size)
    towards_light = ((xx - centre[0]) * scene.light[0] + (yy - centre[1]) * scene.light[1]) / np.float32(radius)
    shade = 0.8 - 0.5 * np.clip(towards_light, -1.0, 1.0)  # the wall facing the light is bright
    texture = 1.0 + 0.15 * _smooth_noise(rng, size, max(0.7, radius / 3))
    target = np.asarray(style.hole, np.float32) * (shade * texture)[..., None]
    depth = _strength(rng, spec, (0.8, 1.0), (0.35, 0.55))
    image = _blend(scene.image, inside * np.float32(depth), target)
    if style.rim:
        rim_width = 1.0 + 0.8 * spec.scale
        rim = np.clip(1.0 - np.abs(dist - rim_width / 2) / rim_width, 0.0, 1.0) * (dist > -0.5) * scene.support
        rim = rim * np.clip(0.5 - 0.5 * towards_light, 0.0, 1.0)
        image = image + (rim * np.float32(0.25 * depth))[..., None] * (1.0 - image)
    return image


def _contamination(rng: np.random.Generator, scene: _Scene, style: _Style, spec: _DefectSpec) -> Array:
    size = scene.image.shape[0]
    colour = np.asarray(style.stains[rng.integers(len(style.stains))], np.float32)
    opacity = _strength(rng, spec, (0.7, 0.95), (0.25, 0.45))
    if rng.random() < style.hair:
        lengths = {"small": (10, 18), "medium": (20, 36), "large": (40, 70)}[spec.size_class]
        length = rng.uniform(*lengths) * spec.scale
        centre = _pick_centre(rng, scene.support, length / 3)
        alpha = _curve_alpha(
            rng, size, centre, rng.uniform(0, np.pi), length, max(1.0, rng.uniform(1.0, 1.6) * spec.scale)
        )
        texture = np.ones((size, size), np.float32)
    else:
        radii = {"small": (2.5, 4.0), "medium": (4.5, 7.5), "large": (8.0, 12.0)}[spec.size_class]
        radius = max(1.5, rng.uniform(*radii) * spec.scale)
        centre = _pick_centre(rng, scene.support, radius + 1.0)
        dist = _polar_shape(rng, size, centre, radius, 0.16, 7)
        alpha = np.clip(0.5 - dist, 0.0, 1.0) * (0.8 + 0.2 * _smoothstep(0.0, -radius / 2, dist))
        texture = 1.0 + 0.25 * _smooth_noise(rng, size, max(0.7, radius / 4))
    alpha = alpha * scene.support * np.float32(opacity)
    return _blend(scene.image, alpha, colour * texture[..., None])


def _colour(rng: np.random.Generator, scene: _Scene, style: _Style, spec: _DefectSpec) -> Array:
    del style
    size = scene.image.shape[0]
    radii = {"small": (3.5, 5.5), "medium": (6.0, 9.5), "large": (10.0, 15.0)}[spec.size_class]
    radius = max(2.0, rng.uniform(*radii) * spec.scale)
    centre = _pick_centre(rng, scene.support, radius + 1.0)
    dist = _polar_shape(rng, size, centre, radius, 0.12, 5)
    edge = 0.5 + 1.5 * spec.scale
    alpha = _smoothstep(edge, -edge, dist) * scene.support
    delta = rng.normal(0.0, 1.0, 3)
    delta -= delta.mean()
    delta /= max(float(np.abs(delta).max()), 1e-6)
    magnitude = _strength(rng, spec, (0.16, 0.28), (0.07, 0.12))
    dim = rng.uniform(0.0, 0.15) * magnitude
    target = scene.image * np.asarray((1.0 + magnitude * delta) * (1.0 - dim), np.float32)
    return _blend(scene.image, alpha, target)


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene, _Style, _DefectSpec], Array]] = {
    "scratch": _scratch,
    "hole": _hole,
    "contamination": _contamination,
    "color": _colour,
}


def _change_mask(normal: Array, defective: Array) -> Array:
    """Boolean mask of pixels changed by at least ``_MIN_CHANGE`` levels, closed (3x3) and hole-filled."""
    diff = np.abs(defective.astype(np.int16) - normal.astype(np.int16)).max(axis=-1)
    core = diff >= _MIN_CHANGE
    if not core.any():
        return core
    closed = ndimage.binary_closing(core, structure=np.ones((3, 3), bool)) | core
    return ndimage.binary_fill_holes(closed)


# ----------------------------------------------------------------------------------------------------------------------
# Sample rendering
# ----------------------------------------------------------------------------------------------------------------------
def _check_category(category: str) -> None:
    if category not in _RENDERERS:
        msg = f"Unknown synthetic category {category!r}; valid categories are: {', '.join(DEMO_CATEGORIES)}"
        raise ValueError(msg)


def _check_config(config: SyntheticConfig) -> None:
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
    _check_category(category)
    _check_config(config)
    if split not in _NORMAL_SPLITS and split not in _DEFECTS:
        msg = f"Unknown split {split!r}; expected one of {', '.join(_NORMAL_SPLITS + DEFECT_TYPES)}"
        raise ValueError(msg)
    if index < 0:
        msg = f"index must be non-negative, got {index}"
        raise ValueError(msg)
    size = config.image_size
    rng = _rng(config, category, split, index, 0)
    scene = _RENDERERS[category](rng, size)
    noise = rng.normal(0.0, 0.006, (size, size, 3)).astype(np.float32)
    noise += rng.normal(0.0, 0.006, (size, size, 1)).astype(np.float32)
    normal = _to_uint8(scene.image + noise)
    if split in _NORMAL_SPLITS:
        return normal, normal.copy(), np.zeros((size, size), np.uint8)

    defect_rng = _rng(config, category, split, index, 1)
    style = _STYLES[category]
    for attempt in range(_MAX_ATTEMPTS):
        spec = _DefectSpec(
            size_class=_SIZE_CLASSES[index % len(_SIZE_CLASSES)],
            subtle=index % 2 == 1 and attempt < _MAX_ATTEMPTS // 2,
            scale=size / _REF_SIZE,
            boost=1.0 + 0.25 * attempt,
        )
        defective = _to_uint8(_DEFECTS[split](defect_rng, scene, style, spec) + noise)
        mask = _change_mask(normal, defective)
        if int(mask.sum()) >= _MIN_DEFECT_PIXELS:
            image = np.where(mask[..., None], defective, normal)
            return normal, image, mask.astype(np.uint8) * np.uint8(255)
    msg = f"could not render a visible {split!r} defect for {category!r} sample {index}"
    raise RuntimeError(msg)


# ----------------------------------------------------------------------------------------------------------------------
# Writing to disk
# ----------------------------------------------------------------------------------------------------------------------
def _marker_payload(category: str, config: SyntheticConfig) -> dict[str, object]:
    return {
        "generator": "anomalib_moleflow.data.synthetic",
        "format_version": FORMAT_VERSION,
        "category": category,
        "config": asdict(config),
        "defect_types": list(DEFECT_TYPES),
    }


def _read_marker(folder: Path) -> object:
    try:
        return json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _save_png(path: Path, array: Array) -> None:
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def generate_category(root: Path | str, category: str, config: SyntheticConfig = DEFAULT_CONFIG) -> Path:
    """Generate one category of the synthetic dataset in the MVTec AD layout.

    The category is rendered into a temporary hidden sibling folder whose JSON marker (:data:`MARKER_NAME`, holding
    the config and :data:`FORMAT_VERSION`) is written last, then renamed to ``root/category``. If ``root/category``
    already holds a marker for the same config, nothing is written. An existing folder with another config, an older
    format or no marker is replaced (it is first renamed aside, then deleted), so a half-written category never
    appears under its final name.

    Args:
        root: Dataset root folder (created if missing).
        category: One of :data:`DEMO_CATEGORIES`.
        config: Dataset configuration.

    Returns:
        Path of the category folder, ``root/category``.

    Raises:
        ValueError: If the category or the config is invalid.
    """
    _check_category(category)
    _check_config(config)
    root = Path(root)
    target = root / category
    expected = _marker_payload(category, config)
    if _read_marker(target) == expected:
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)
        _write_category(tmp, category, config)
        (tmp / MARKER_NAME).write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        old = root / f".{category}.{uuid.uuid4().hex}.old"
        if target.exists() or target.is_symlink():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists() and old.exists():
                os.replace(old, target)  # put the previous folder back
            # Another process may have put the very same category in place meanwhile: that is fine.
            if _read_marker(target) != expected:
                raise
        finally:
            _remove(old)
    finally:
        _remove(tmp)
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
        ValueError: If a category or the config is invalid (checked before anything is written).
    """
    if isinstance(categories, str):
        categories = (categories,)
    for category in categories:
        _check_category(category)
    _check_config(config)
    root = Path(root)
    for category in dict.fromkeys(categories):
        generate_category(root, category, config)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: generate the synthetic dataset into a folder.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_moleflow.data.synthetic",
        description="Generate a procedural MVTec-AD-layout anomaly detection dataset.",
    )
    parser.add_argument("root", type=Path, help="dataset root folder")
    parser.add_argument(
        "--categories",
        nargs="+",
        default=list(DEMO_CATEGORIES),
        choices=DEMO_CATEGORIES,
        metavar="CATEGORY",
        help=f"categories to generate (default: all of {', '.join(DEMO_CATEGORIES)})",
    )
    parser.add_argument("--image-size", type=int, default=DEFAULT_CONFIG.image_size, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=DEFAULT_CONFIG.n_train, help="normal training images")
    parser.add_argument("--n-test-good", type=int, default=DEFAULT_CONFIG.n_test_good, help="normal test images")
    parser.add_argument(
        "--n-test-defect", type=int, default=DEFAULT_CONFIG.n_test_defect, help="test images per defect type"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG.seed, help="base random seed")
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    for category in dict.fromkeys(args.categories):
        path = generate_category(args.root, category, config)
        sys.stdout.write(f"{path}\n")
    sys.stdout.write(f"generated {len(set(args.categories))} categories in {time.perf_counter() - start:.1f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
