"""Rasterise scenes: hard pixels, exact palette colours, no antialiasing."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from relaydiff.world.scene import Obj, Scene
from relaydiff.world.vocab import BACKGROUNDS, PALETTE, REF_SIZE, SHAPES, SIZES


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, a: float = 1.0) -> np.ndarray:
    """Inside-test of ``shape`` with half-extent ``a`` at offsets (dx, dy) from its centre.

    ``dx`` grows rightwards and ``dy`` downwards; the shape's bounding box is [-a, a]^2 and
    boundary points count as inside. Arrays broadcast (e.g. ``dx`` (1, W), ``dy`` (H, 1)).
    """
    if shape == "circle":
        return dx * dx + dy * dy <= a * a
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= a
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= a
    if shape == "triangle":  # apex at (0, -a), base from (-a, a) to (a, a)
        return (dy <= a) & (2.0 * np.abs(dx) <= dy + a)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


@lru_cache(maxsize=65536)
def _stamp(shape: str, size: str, n: int, cx: float, cy: float) -> tuple[int, int, np.ndarray]:
    """(row0, col0, mask) of one object on an n-px canvas; mask covers only its window."""
    x, y = cx * n, cy * n
    a = SIZES[size] * n / (2 * REF_SIZE)  # half-extent in pixels
    r0, r1 = max(0, int(np.floor(y - a)) - 1), min(n, int(np.ceil(y + a)) + 1)
    c0, c1 = max(0, int(np.floor(x - a)) - 1), min(n, int(np.ceil(x + a)) + 1)
    # Offsets of pixel centres in pixels: exact in float64 for centres on the 1/64 grid.
    dx = (np.arange(c0, c1) + 0.5 - x)[None, :]
    dy = (np.arange(r0, r1) + 0.5 - y)[:, None]
    mask = shape_mask(shape, dx, dy, a)
    mask.setflags(write=False)
    return r0, c0, mask


def object_mask(obj: Obj, size: int = REF_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of the pixels ``obj`` covers on a ``size``-px canvas."""
    r0, c0, m = _stamp(obj.shape, obj.size, size, obj.cx, obj.cy)
    out = np.zeros((size, size), dtype=bool)
    out[r0 : r0 + m.shape[0], c0 : c0 + m.shape[1]] = m
    return out


def _draw(out: np.ndarray, scene: Scene) -> None:
    n = out.shape[0]
    out[...] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        r0, c0, m = _stamp(o.shape, o.size, n, o.cx, o.cy)
        out[r0 : r0 + m.shape[0], c0 : c0 + m.shape[1]][m] = PALETTE[o.colour]


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        raise ValueError(f"canvas size must be an int >= 16, got {size!r}")


def render(scene: Scene, size: int = REF_SIZE) -> np.ndarray:
    """Draw ``scene`` on a ``size``-px square canvas.

    Returns:
        (size, size, 3) uint8 RGB; every pixel is exactly a palette or background colour.
    Raises:
        ValueError: if ``size`` is not an int >= 16.
    """
    _check_size(size)
    out = np.empty((size, size, 3), dtype=np.uint8)
    _draw(out, scene)
    return out


def render_batch(scenes: list[Scene], size: int = REF_SIZE) -> np.ndarray:
    """Draw many scenes into one (n, size, size, 3) uint8 array."""
    _check_size(size)
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, s in enumerate(scenes):
        _draw(out[i], s)
    return out
