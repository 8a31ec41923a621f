"""Defects: per-category defect styles, the four defect renderers, and the ground-truth change mask."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .primitives import RGB, Array, grid, local_coords, smooth_noise, smoothstep
from .scenes import Scene

__all__ = ["DEFECTS", "DEFECT_TYPES", "STYLES", "DefectSpec", "Style", "change_mask"]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "contamination", "color")

_MIN_CHANGE = 2  # an 8-bit change of at least this many levels marks a pixel as anomalous


@dataclass(frozen=True)
class Style:
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


STYLES: dict[str, Style] = {
    "woven": Style(
        0.6,
        ((0.30, 0.20, 0.12), (0.08, 0.08, 0.08), (0.62, 0.32, 0.15), (0.86, 0.82, 0.66)),
        (0.04, 0.04, 0.05),
        rim=False,
        hair=0.35,
    ),
    "wood": Style(
        0.7, ((0.16, 0.10, 0.07), (0.35, 0.40, 0.30), (0.88, 0.87, 0.84)), (0.20, 0.12, 0.06), rim=True, hair=0.2
    ),
    "marble": Style(
        0.3, ((0.55, 0.40, 0.25), (0.20, 0.20, 0.22), (0.66, 0.55, 0.28)), (0.45, 0.43, 0.40), rim=True, hair=0.25
    ),
    "pill": Style(
        0.2, ((0.32, 0.23, 0.15), (0.12, 0.12, 0.12), (0.70, 0.58, 0.32)), (0.55, 0.50, 0.42), rim=False, hair=0.0
    ),
    "screw": Style(
        0.75, ((0.45, 0.25, 0.12), (0.08, 0.08, 0.08), (0.88, 0.88, 0.84)), (0.14, 0.14, 0.15), rim=True, hair=0.0
    ),
}


@dataclass(frozen=True)
class DefectSpec:
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
    u, v = local_coords(size, centre[0], centre[1], rng.uniform(0, np.pi))
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
    rng: np.random.Generator, spec: DefectSpec, normal: tuple[float, float], subtle: tuple[float, float]
) -> float:
    low, high = subtle if spec.subtle else normal
    return float(min(1.0, rng.uniform(low, high) * spec.boost))


def _blend(image: Array, alpha: Array, target: Array) -> Array:
    a = alpha[..., None]
    return image * (1.0 - a) + target * a


def _scratch(rng: np.random.Generator, scene: Scene, style: Style, spec: DefectSpec) -> Array:
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


def _hole(rng: np.random.Generator, scene: Scene, style: Style, spec: DefectSpec) -> Array:
    radii = {"small": (2.0, 3.5), "medium": (4.0, 6.5), "large": (7.0, 10.0)}[spec.size_class]
    radius = max(1.5, rng.uniform(*radii) * spec.scale)
    size = scene.image.shape[0]
    centre = _pick_centre(rng, scene.support, radius + 2.0)
    dist = _polar_shape(rng, size, centre, radius, 0.12, 4)
    inside = np.clip(0.5 - dist, 0.0, 1.0) * scene.support
    yy, xx = grid(size)
    towards_light = ((xx - centre[0]) * scene.light[0] + (yy - centre[1]) * scene.light[1]) / np.float32(radius)
    shade = 0.8 - 0.5 * np.clip(towards_light, -1.0, 1.0)  # the wall facing the light is bright
    texture = 1.0 + 0.15 * smooth_noise(rng, size, max(0.7, radius / 3))
    target = np.asarray(style.hole, np.float32) * (shade * texture)[..., None]
    depth = _strength(rng, spec, (0.8, 1.0), (0.35, 0.55))
    image = _blend(scene.image, inside * np.float32(depth), target)
    if style.rim:
        rim_width = 1.0 + 0.8 * spec.scale
        rim = np.clip(1.0 - np.abs(dist - rim_width / 2) / rim_width, 0.0, 1.0) * (dist > -0.5) * scene.support
        rim = rim * np.clip(0.5 - 0.5 * towards_light, 0.0, 1.0)
        image = image + (rim * np.float32(0.25 * depth))[..., None] * (1.0 - image)
    return image


def _contamination(rng: np.random.Generator, scene: Scene, style: Style, spec: DefectSpec) -> Array:
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
        alpha = np.clip(0.5 - dist, 0.0, 1.0) * (0.8 + 0.2 * smoothstep(0.0, -radius / 2, dist))
        texture = 1.0 + 0.25 * smooth_noise(rng, size, max(0.7, radius / 4))
    alpha = alpha * scene.support * np.float32(opacity)
    return _blend(scene.image, alpha, colour * texture[..., None])


def _colour(rng: np.random.Generator, scene: Scene, style: Style, spec: DefectSpec) -> Array:
    del style
    size = scene.image.shape[0]
    radii = {"small": (3.5, 5.5), "medium": (6.0, 9.5), "large": (10.0, 15.0)}[spec.size_class]
    radius = max(2.0, rng.uniform(*radii) * spec.scale)
    centre = _pick_centre(rng, scene.support, radius + 1.0)
    dist = _polar_shape(rng, size, centre, radius, 0.12, 5)
    edge = 0.5 + 1.5 * spec.scale
    alpha = smoothstep(edge, -edge, dist) * scene.support
    delta = rng.normal(0.0, 1.0, 3)
    delta -= delta.mean()
    delta /= max(float(np.abs(delta).max()), 1e-6)
    magnitude = _strength(rng, spec, (0.16, 0.28), (0.07, 0.12))
    dim = rng.uniform(0.0, 0.15) * magnitude
    target = scene.image * np.asarray((1.0 + magnitude * delta) * (1.0 - dim), np.float32)
    return _blend(scene.image, alpha, target)


DEFECTS: dict[str, Callable[[np.random.Generator, Scene, Style, DefectSpec], Array]] = {
    "scratch": _scratch,
    "hole": _hole,
    "contamination": _contamination,
    "color": _colour,
}


def change_mask(normal: Array, defective: Array) -> Array:
    """Boolean mask of pixels changed by at least ``_MIN_CHANGE`` levels, closed (3x3) and hole-filled."""
    diff = np.abs(defective.astype(np.int16) - normal.astype(np.int16)).max(axis=-1)
    core = diff >= _MIN_CHANGE
    if not core.any():
        return core
    closed = ndimage.binary_closing(core, structure=np.ones((3, 3), bool)) | core
    return ndimage.binary_fill_holes(closed)
