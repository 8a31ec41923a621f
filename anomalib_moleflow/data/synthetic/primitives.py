"""Numerical building blocks of the renderers: pixel grids, smooth noise, lighting, colour jitter, 8-bit conversion."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

__all__ = [
    "REF_SIZE",
    "RGB",
    "Array",
    "drop_shadow",
    "fractal_noise",
    "grid",
    "illumination",
    "jitter_colour",
    "light_direction",
    "local_coords",
    "smooth_noise",
    "smoothstep",
    "to_uint8",
    "vignette",
]

Array = np.ndarray
RGB = tuple[float, float, float]

REF_SIZE = 128.0  # geometric constants of the renderers are expressed in pixels at this image size


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[Array, Array]:
    """Return read-only ``(yy, xx)`` pixel-centre coordinate grids of shape ``(size, size)``."""
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def local_coords(size: int, cx: float, cy: float, angle: float) -> tuple[Array, Array]:
    """Coordinates ``(u, v)`` in pixels around ``(cx, cy)``; ``u`` runs along the direction ``angle``."""
    yy, xx = grid(size)
    dx = xx - np.float32(cx)
    dy = yy - np.float32(cy)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return dx * c + dy * s, dy * c - dx * s


def smoothstep(edge0: float, edge1: float, x: Array) -> Array:
    """Smooth Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (``edge1 < edge0`` gives a falling step)."""
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


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> Array:
    """Periodic Gaussian-filtered white noise with unit standard deviation (filtered in the Fourier domain)."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    transfer = _gaussian_transfer(size, round(max(sigma, 0.3), 4))
    field = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size)).astype(np.float32)
    std = float(field.std())
    return field / np.float32(std) if std > 1e-8 else field


def fractal_noise(rng: np.random.Generator, size: int, sigma: float, octaves: int = 4) -> Array:
    """Sum of smooth noise octaves (halving sigma, persistence 0.5), unit-ish standard deviation."""
    total = np.zeros((size, size), dtype=np.float32)
    amp, norm = 1.0, 0.0
    for _ in range(octaves):
        total += np.float32(amp) * smooth_noise(rng, size, sigma)
        norm += amp * amp
        amp *= 0.5
        sigma *= 0.5
    return total / np.float32(np.sqrt(norm))


def illumination(rng: np.random.Generator, size: int, strength: float) -> Array:
    """Multiplicative linear illumination gradient around 1."""
    yy, xx = grid(size)
    gx, gy = rng.normal(0.0, strength, 2)
    return 1.0 + np.float32(gx) * (xx / size - 0.5) + np.float32(gy) * (yy / size - 0.5)


def vignette(size: int, strength: float) -> Array:
    """Multiplicative radial darkening, 1 at the centre and ``1 - strength`` at the corners."""
    yy, xx = grid(size)
    r2 = ((xx / size - 0.5) ** 2 + (yy / size - 0.5) ** 2) * 2.0
    return 1.0 - np.float32(strength) * r2


def jitter_colour(rng: np.random.Generator, colour: RGB, amount: float) -> Array:
    """Random brightness change of relative size ``amount`` and a four times smaller change of hue."""
    factor = (1.0 + rng.normal(0.0, amount)) * (1.0 + rng.normal(0.0, amount / 4, 3))
    return np.clip(np.asarray(colour, dtype=np.float32) * factor, 0.0, 1.0).astype(np.float32)


def light_direction(rng: np.random.Generator) -> Array:
    """Unit vector towards a light in the upper left (x right, y down, z towards the camera)."""
    light = np.array([-0.45 + rng.normal(0, 0.06), -0.55 + rng.normal(0, 0.06), 0.7], dtype=np.float32)
    return light / np.float32(np.linalg.norm(light))


def drop_shadow(alpha: Array, size: int, strength: float) -> Array:
    """Multiplicative darkening of the background by a blurred, offset copy of the object's coverage."""
    s = size / REF_SIZE
    shift = max(1, round(3 * s))
    shadow = ndimage.gaussian_filter(np.roll(alpha, (shift, shift), axis=(0, 1)), 3.0 * s)
    return 1.0 - np.float32(strength) * shadow


def to_uint8(image: Array) -> Array:
    """Float image in ``[0, 1]`` to rounded, clipped ``uint8``."""
    return np.clip(np.rint(image * np.float32(255.0)), 0, 255).astype(np.uint8)
