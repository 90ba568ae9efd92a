"""Classical object detection for world images: colour segmentation plus shape geometry.

No learned parts. Each pixel takes its nearest reference colour; connected pixels within
COLOUR_TOLERANCE of palette colours seed blobs. Around each blob an opacity map is
measured (how far each pixel lies from the background towards the blob's colour), and the
world shape whose model best explains that map is the blob's shape. The model is fitted by
moments that blur leaves unchanged (mass and centroid), so soft or noisy images from a
generator are judged like hard renders; see docs/world.md, "Scoring".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from relaydiff.world.render import shape_mask
from relaydiff.world.vocab import BACKGROUNDS, PALETTE, REF_SIZE, SHAPES, SIZES

COLOUR_TOLERANCE = 70.0  # max RGB distance from a palette colour for a pixel to seed a blob
OFF_LINE_TOLERANCE = 60.0  # max RGB distance of a pixel from the background-to-colour segment
MIN_SEED_REF = 3  # seeds smaller than this (px of a 32-px canvas) are noise
MIN_MASS_REF = 6.0  # blobs whose opacity sums to less than this (px of a 32-px canvas) are noise
REGION_REF = 2.0  # opacity is measured up to this far (px of a 32-px canvas) from a seed
BLURS_REF = (0.0, 0.5, 0.9)  # blur widths (px of a 32-px canvas) tried for shape models
SUPERSAMPLE = 4  # sub-samples per pixel side when drawing shape models
# Shape area over squared half-extent: mass = K * a^2.
AREA_FACTOR = {"circle": float(np.pi), "square": 4.0, "diamond": 2.0, "triangle": 2.0}
# Centroid minus bounding-box centre along y, over the half-extent (the apex-up triangle's
# centroid sits a/3 below its box centre).
CENTROID_DY = {"circle": 0.0, "square": 0.0, "diamond": 0.0, "triangle": 1.0 / 3.0}
# Side (px of a 32-px canvas) separating "small" (7) from "large" (13).
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2

_OBJECT_NAMES = tuple(PALETTE)
_REFERENCE = np.array(list(PALETTE.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    colour: str  # palette name
    shape: str  # best-fitting shape
    size: str  # "small" or "large"
    centre: tuple[float, float]  # fitted bounding-box centre (cx, cy) as canvas fractions
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of pixels >= half opaque, end exclusive
    area: float  # opacity mass in pixels (a hard render: the pixel count)
    extent: float  # fitted bounding-box side in px of a 32-px canvas
    shape_scores: tuple[tuple[str, float], ...]  # fit of each shape model, 1 = perfect


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be an (H, W, 3) array, got {got!r}")
    if image.shape[0] != image.shape[1] or image.shape[0] < 16:
        raise ValueError(f"image must be square and at least 16 px, got {image.shape!r}")


def detect_background(image: np.ndarray) -> str:
    """The background colour nearest to the median of the image's border pixels."""
    _check_image(image)
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    med = np.median(border, axis=0)
    return _BG_NAMES[int(np.argmin(((_BG_RGB - med) ** 2).sum(axis=1)))]


def _opacity(img: np.ndarray, bg: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Position of each pixel along the segment bg -> colour, in [0, 1]; 0 if far off it."""
    d = colour - bg
    rel = img - bg
    t = (rel @ d) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    off = np.linalg.norm(rel - t[..., None] * d, axis=-1)
    return np.where(off <= OFF_LINE_TOLERANCE, t, 0.0)


def _model(
    shape: str, x: float, y: float, a: float, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Pixel coverage of ``shape`` (centre x, y, half-extent a, in px) on the given grid."""
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (cols[:, None] + sub[None, :]).ravel() - x
    ys = (rows[:, None] + sub[None, :]).ravel() - y
    m = shape_mask(shape, xs[None, :], ys[:, None], a)
    return m.reshape(len(rows), SUPERSAMPLE, len(cols), SUPERSAMPLE).mean(axis=(1, 3))


@lru_cache(maxsize=1024)
def _blur_matrix(length: int, sigma: float) -> np.ndarray:
    """(length, length) Gaussian blur with zero padding; blur(m) = B_rows @ m @ B_cols.T."""
    i = np.arange(length)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    radius = int(4 * sigma + 0.5)
    k[np.abs(i[:, None] - i[None, :]) > radius] = 0.0
    k /= np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
    k.setflags(write=False)
    return k


def _fit(
    alpha: np.ndarray, region: np.ndarray, r0: int, c0: int, scale: float
) -> tuple[str, float, float, float, tuple[tuple[str, float], ...]]:
    """Best (shape, x, y, half-extent, scores) for an opacity window; coordinates in px."""
    mass = float(alpha.sum())
    rows = np.arange(r0, r0 + alpha.shape[0])
    cols = np.arange(c0, c0 + alpha.shape[1])
    mx = float((alpha.sum(axis=0) * (cols + 0.5)).sum() / mass)
    my = float((alpha.sum(axis=1) * (rows + 0.5)).sum() / mass)
    energy = float((alpha**2).sum())
    best: tuple[float, str, float, float, float] | None = None
    scores = []
    for s in SHAPES:
        a = float(np.sqrt(mass / AREA_FACTOR[s]))
        y = my - CENTROID_DY[s] * a
        model = _model(s, mx, y, a, rows, cols)
        err = np.inf
        for blur in BLURS_REF:
            if blur:
                by = _blur_matrix(model.shape[0], blur / scale)
                bx = _blur_matrix(model.shape[1], blur / scale)
                m = by @ model @ bx.T
            else:
                m = model
            err = min(err, float((((m - alpha) * region) ** 2).sum()))
        fit = 1.0 - err / energy
        scores.append((s, fit))
        if best is None or fit > best[0]:
            best = (fit, s, mx, y, a)
    assert best is not None
    return best[1], best[2], best[3], best[4], tuple(scores)


def detect(image: np.ndarray) -> list[Detection]:
    """Find the coloured objects in a world image (exact or generated).

    Args:
        image: (N, N, 3) RGB, uint8 or float in 0..255.
    Returns:
        detections in PALETTE colour order, then top-left first.
    Raises:
        ValueError: if ``image`` is not a square (N, N, 3) array with N >= 16.
    """
    from scipy import ndimage  # imported here: nothing heavy at import time

    _check_image(image)
    n = image.shape[0]
    scale = REF_SIZE / n  # px of the 32-px canvas per image px
    img = np.asarray(image, dtype=np.float32)
    bg = _BG_RGB[_BG_NAMES.index(detect_background(image))]

    # 1. Seeds: pixels near a palette colour, grouped as 8-connected components over all
    #    colours, so an object whose colour drifts across a palette boundary stays whole
    #    (distinct objects are OBJECT_GAP px apart). A group takes the colour most of its
    #    seed pixels are nearest to.
    d2 = ((img[:, :, None, :] - _REFERENCE[None, None]) ** 2).sum(axis=-1)
    nearest = np.argmin(d2, axis=-1)
    close = np.take_along_axis(d2, nearest[..., None], axis=-1)[..., 0] <= COLOUR_TOLERANCE**2
    any_seed = close & (nearest < len(_OBJECT_NAMES))
    if not any_seed.any():
        return []
    groups, count = ndimage.label(any_seed, structure=np.ones((3, 3), dtype=bool))
    groups = np.where(any_seed, groups, 0)
    votes = np.zeros((count + 1, len(_OBJECT_NAMES)), dtype=np.int64)
    np.add.at(votes, (groups[any_seed], nearest[any_seed]), 1)
    seeds = np.zeros((n, n), dtype=np.int32)
    seed_colour: list[int] = []
    for g in np.flatnonzero(votes.sum(axis=1) >= MIN_SEED_REF / scale**2):
        seed_colour.append(int(np.argmax(votes[g])))
        seeds[groups == g] = len(seed_colour)
    if not seed_colour:
        return []

    # 2. Each pixel near a seed belongs to its nearest seed; measure opacity there.
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = np.where(dist <= REGION_REF / scale, seeds[iy, ix], 0)
    out: list[Detection] = []
    for k, ci in enumerate(seed_colour, start=1):
        region = owner == k
        ys, xs = np.nonzero(region)
        r0, r1, c0, c1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        win = region[r0:r1, c0:c1]
        alpha = _opacity(img[r0:r1, c0:c1], bg, _REFERENCE[ci]) * win
        mass = float(alpha.sum())
        if mass < MIN_MASS_REF / scale**2:
            continue
        # 3. Shape: the model (drawn at the blob's mass and centroid) closest to the opacity.
        shape, x, y, a, scores = _fit(alpha, win, int(r0), int(c0), scale)
        solid = np.nonzero(alpha >= 0.5)
        if len(solid[0]):
            bbox = (
                int(c0 + solid[1].min()),
                int(r0 + solid[0].min()),
                int(c0 + solid[1].max() + 1),
                int(r0 + solid[0].max() + 1),
            )
        else:
            bbox = (int(c0), int(r0), int(c1), int(r1))
        extent = 2 * a * scale
        out.append(
            Detection(
                colour=_OBJECT_NAMES[ci],
                shape=shape,
                size="small" if extent < SIZE_THRESHOLD else "large",
                centre=(x / n, y / n),
                bbox=bbox,
                area=mass,
                extent=extent,
                shape_scores=scores,
            )
        )
    return out
