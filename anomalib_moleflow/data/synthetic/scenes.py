"""Normal scenes: one procedural renderer per category (three textures, two objects)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .primitives import (
    REF_SIZE,
    Array,
    drop_shadow,
    fractal_noise,
    illumination,
    jitter_colour,
    light_direction,
    local_coords,
    smooth_noise,
    smoothstep,
    vignette,
)

__all__ = ["DEMO_CATEGORIES", "OBJECT_CATEGORIES", "RENDERERS", "TEXTURE_CATEGORIES", "Scene"]

TEXTURE_CATEGORIES: tuple[str, ...] = ("woven", "wood", "marble")
OBJECT_CATEGORIES: tuple[str, ...] = ("pill", "screw")
DEMO_CATEGORIES: tuple[str, ...] = TEXTURE_CATEGORIES + OBJECT_CATEGORIES


@dataclass(frozen=True)
class Scene:
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


def _render_woven(rng: np.random.Generator, size: int) -> Scene:
    """Plain-weave fabric: indigo warp threads interlaced with light weft threads."""
    s = size / REF_SIZE
    period = 8.0 * s * rng.uniform(0.96, 1.04)
    u, v = local_coords(size, rng.uniform(0, size), rng.uniform(0, size), np.deg2rad(rng.normal(0.0, 1.5)))
    u = u + np.float32(0.1 * period) * smooth_noise(rng, size, 12.0 * s)
    v = v + np.float32(0.1 * period) * smooth_noise(rng, size, 12.0 * s)
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
    fuzz = smooth_noise(rng, size, 0.7 * s)
    lum = (0.28 + 0.72 * height) * tone * (1.0 + 0.06 * fuzz)
    warp_col = jitter_colour(rng, (0.24, 0.32, 0.50), 0.03)
    weft_col = jitter_colour(rng, (0.66, 0.66, 0.68), 0.03)
    image = lum[..., None] * np.where(over[..., None], warp_col, weft_col)
    shading = illumination(rng, size, 0.15) * (1.0 + 0.04 * fractal_noise(rng, size, 24.0 * s, 3))
    image = image * shading[..., None]
    return Scene(image.astype(np.float32), np.ones((size, size), np.float32), light_direction(rng))


def _render_wood(rng: np.random.Generator, size: int) -> Scene:
    """Planed wood: growth rings with cathedral arches, fibres following the grain."""
    s = size / REF_SIZE
    u, v = local_coords(size, size / 2, size / 2, np.deg2rad(rng.normal(0.0, 3.0)))
    curvature = rng.uniform(-1.0, 1.0) * 0.5 / size
    v0 = rng.uniform(-0.8, 0.8) * size
    t = (
        u
        + np.float32(curvature) * (v - np.float32(v0)) ** 2
        + np.float32(2.0 * s) * fractal_noise(rng, size, 32 * s, 3)
    )
    t = t + np.float32(rng.uniform(0, 100) * s)
    period = 10.0 * s * rng.uniform(0.85, 1.15)
    phase = t / np.float32(period) + 0.15 * smooth_noise(rng, size, 30.0 * s)
    ring = 0.5 + 0.5 * np.cos(2.0 * np.pi * phase)
    late = ring**6 * np.clip(0.8 + 0.25 * smooth_noise(rng, size, 16.0 * s), 0.3, 1.2)
    table = ndimage.gaussian_filter1d(rng.standard_normal(512).astype(np.float32), 0.8, mode="wrap")
    table /= np.float32(table.std())
    fibres = np.interp((t / np.float32(0.8 * s)).ravel() % 512, np.arange(512), table).reshape(t.shape)
    tone = np.clip(0.55 * late + 0.18 * ring + 0.05 * fibres, 0.0, 1.0).astype(np.float32)
    light_col = jitter_colour(rng, (0.80, 0.62, 0.42), 0.03)
    dark_col = jitter_colour(rng, (0.50, 0.32, 0.17), 0.03)
    image = light_col * (1.0 - tone[..., None]) + dark_col * tone[..., None]
    image = image * (1.0 + 0.06 * fibres.astype(np.float32))[..., None]
    image = image * illumination(rng, size, 0.15)[..., None]
    return Scene(image.astype(np.float32), np.ones((size, size), np.float32), light_direction(rng))


def _render_marble(rng: np.random.Generator, size: int) -> Scene:
    """Polished marble: cloudy cream base with a few long turbulent grey-green veins and thin cracks."""
    s = size / REF_SIZE
    u, v = local_coords(size, size / 2, size / 2, np.deg2rad(35.0 + rng.normal(0.0, 12.0)))
    turbulence = fractal_noise(rng, size, 22 * s, 3)
    phase = u / np.float32(0.45 * size) + 0.45 * turbulence + np.float32(rng.uniform(0, 1))
    sine = np.abs(np.sin(np.pi * phase))
    fade = np.clip(0.55 + 0.6 * smooth_noise(rng, size, 14 * s), 0.0, 1.0)
    vein = (np.exp(-sine / 0.07) + 0.25 * np.exp(-sine / 0.45)) * fade
    phase2 = v / np.float32(0.3 * size) + 0.8 * fractal_noise(rng, size, 12 * s, 3) + np.float32(rng.uniform(0, 1))
    crack = np.exp(-np.abs(np.sin(np.pi * phase2)) / 0.03) * np.clip(smooth_noise(rng, size, 10 * s), 0.0, 1.0)
    cloud = fractal_noise(rng, size, 28 * s, 4)
    base = jitter_colour(rng, (0.89, 0.88, 0.84), 0.015) * (1.0 + 0.04 * cloud)[..., None]
    vein_col = jitter_colour(rng, (0.42, 0.47, 0.45), 0.03)
    amount = np.clip(0.7 * vein + 0.3 * crack, 0.0, 0.85)[..., None]
    image = base * (1.0 - amount) + vein_col * amount
    image = image * illumination(rng, size, 0.1)[..., None]
    return Scene(image.astype(np.float32), np.ones((size, size), np.float32), light_direction(rng))


def _render_pill(rng: np.random.Generator, size: int) -> Scene:
    """A white capsule-shaped tablet with red speckles and a score line on a dark background."""
    s = size / REF_SIZE
    scale = rng.uniform(0.96, 1.04)
    half_len, radius = 0.36 * size * scale, 0.18 * size * scale
    cx, cy = size / 2 + rng.normal(0, 0.012 * size), size / 2 + rng.normal(0, 0.012 * size)
    angle = np.deg2rad(rng.normal(0.0, 3.0))
    u, v = local_coords(size, cx, cy, angle)
    du = np.maximum(np.abs(u) - np.float32(half_len - radius), 0.0)
    dist = np.sqrt(du * du + v * v) - np.float32(radius)  # signed distance in pixels, negative inside
    alpha = np.clip(0.5 - dist, 0.0, 1.0)
    inner = np.clip(-dist / np.float32(radius), 0.0, 1.0)
    height = np.sqrt(inner * (2.0 - inner)) * np.float32(0.45 * radius)
    gy, gx = np.gradient(height)
    normal = np.stack([-gx, -gy, np.ones_like(gx)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = light_direction(rng)
    half = (light + np.array([0, 0, 1], np.float32)) / np.float32(np.linalg.norm(light + np.array([0, 0, 1])))
    lambert = np.clip(normal @ light, 0.0, 1.0)
    spec = np.clip(normal @ half, 0.0, 1.0) ** 30

    albedo = np.broadcast_to(jitter_colour(rng, (0.93, 0.90, 0.83), 0.015), (size, size, 3))
    spots = np.zeros((size, size), np.float32)
    candidates = np.flatnonzero(dist < -2.5 * s - 1.0)
    n_spots = int(rng.integers(8, 20))
    spots.flat[rng.choice(candidates, n_spots)] = rng.uniform(0.5, 1.0, n_spots)
    sigma = max(0.55, 0.75 * s)
    spots = np.clip(ndimage.gaussian_filter(spots, sigma) * np.float32(2 * np.pi * sigma * sigma), 0, 0.9)[..., None]
    albedo = albedo * (1.0 - spots) + jitter_colour(rng, (0.70, 0.30, 0.22), 0.05) * spots
    groove = np.exp(-(((u - np.float32(rng.normal(0, 0.3))) / np.float32(0.8 * s + 0.3)) ** 2)) * (inner > 0.08)
    albedo = albedo * (1.0 - 0.22 * groove.astype(np.float32))[..., None]
    albedo = albedo * (1.0 + 0.02 * smooth_noise(rng, size, 1.0 * s))[..., None]
    pill = albedo * (0.3 + 0.8 * lambert)[..., None] + 0.3 * spec[..., None]

    bg_col = jitter_colour(rng, (0.10, 0.10, 0.11), 0.05)
    background = bg_col * (1.0 + 0.15 * fractal_noise(rng, size, 20 * s, 3))[..., None]
    background = background * (vignette(size, 0.4) * drop_shadow(alpha, size, 0.6))[..., None]
    image = background * (1.0 - alpha[..., None]) + pill * alpha[..., None]
    image = image * illumination(rng, size, 0.08)[..., None]
    support = np.clip(-dist - 1.0, 0.0, 1.0)
    return Scene(image.astype(np.float32), support.astype(np.float32), light, float(angle))


def _render_screw(rng: np.random.Generator, size: int) -> Scene:
    """A metal screw (side view: head, shank, helical thread, tip) lying on a light background."""
    scale = size * rng.uniform(0.96, 1.04)
    cx, cy = size / 2 + rng.normal(0, 0.015 * size), size / 2 + rng.normal(0, 0.015 * size)
    angle = np.deg2rad(-25.0 + rng.normal(0.0, 5.0))
    u, v = local_coords(size, cx, cy, angle)
    head_u0, head_u1, head_r, corner = -0.40 * scale, -0.29 * scale, 0.12 * scale, 0.025 * scale
    shaft_r, amp, pitch = 0.052 * scale, 0.013 * scale, 0.036 * scale * rng.uniform(0.97, 1.03)
    thread_start, tip_start, tip_end = -0.17 * scale, 0.28 * scale, 0.41 * scale

    qx = np.abs(u - np.float32((head_u0 + head_u1) / 2)) - np.float32((head_u1 - head_u0) / 2 - corner)
    qy = np.abs(v) - np.float32(head_r - corner)
    d_head = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - np.float32(corner)

    phase = (u + 0.45 * v) / np.float32(pitch) + np.float32(rng.uniform(0, 1))
    frac = phase - np.floor(phase)
    crest = 1.0 - 2.0 * np.abs(frac - 0.5)  # 1 on the crest of the thread, 0 in the root
    threaded = smoothstep(thread_start, thread_start + pitch, u)
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
    light = light_direction(rng)
    c, s = np.cos(angle), np.sin(angle)
    light_local = np.array([light[0] * c + light[1] * s, light[1] * c - light[0] * s, light[2]], np.float32)
    half = light_local + np.array([0, 0, 1], np.float32)
    half /= np.float32(np.linalg.norm(half))
    lambert = np.clip(normal @ light_local, 0.0, 1.0)
    spec = np.clip(normal @ half, 0.0, 1.0) ** 20
    metal_col = jitter_colour(rng, (0.52, 0.53, 0.55), 0.02)
    grooves = np.where(in_head, 1.0, 0.72 + 0.28 * (crest * threaded + (1.0 - threaded)))
    brushed = 1.0 + 0.03 * smooth_noise(rng, size, 0.8 * size / REF_SIZE)
    metal = metal_col * ((0.25 + 0.8 * lambert) * grooves * brushed)[..., None] + 0.45 * spec[..., None]

    s_rel = size / REF_SIZE
    bg_col = jitter_colour(rng, (0.80, 0.80, 0.77), 0.02)
    background = bg_col * (1.0 + 0.025 * fractal_noise(rng, size, 20 * s_rel, 3))[..., None]
    background = background * (vignette(size, 0.25) * drop_shadow(alpha, size, 0.45))[..., None]
    image = background * (1.0 - alpha[..., None]) + metal * alpha[..., None]
    image = image * illumination(rng, size, 0.08)[..., None]
    support = np.clip(-dist - 0.8, 0.0, 1.0)
    return Scene(image.astype(np.float32), support.astype(np.float32), light, float(angle))


RENDERERS: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "woven": _render_woven,
    "wood": _render_wood,
    "marble": _render_marble,
    "pill": _render_pill,
    "screw": _render_screw,
}
