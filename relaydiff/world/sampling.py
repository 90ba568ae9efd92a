"""Seeded sampling of scenes, prompts and rendered training batches."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from relaydiff.world.render import render_batch
from relaydiff.world.scene import MAX_OBJECTS, Obj, Relation, Scene
from relaydiff.world.splits import check_split, split_of_scene
from relaydiff.world.vocab import (
    BACKGROUNDS,
    CENTRE_HALF,
    EDGE_MARGIN,
    N_OBJECTS_WEIGHTS,
    OBJECT_GAP,
    P_MENTION_BACKGROUND,
    PALETTE,
    POSITIONS,
    REF_SIZE,
    RELATIONS,
    SAMPLE_SLACK,
    SHAPES,
    SIZES,
)

_SIZE_NAMES = tuple(SIZES)
_BG_NAMES = tuple(BACKGROUNDS)
# All (colour, shape) identities; a scene draws distinct ones.
_IDENTITIES = tuple((c, s) for c in PALETTE for s in SHAPES)
_N_CUM = np.cumsum([N_OBJECTS_WEIGHTS[k] for k in range(1, MAX_OBJECTS + 1)])
_ROUNDS = 8  # anchor draws before identities, sizes and relations are redrawn


def _half(size: str) -> float:
    return SIZES[size] / 2


def _k_range(size: str) -> tuple[int, int]:
    """Inclusive range of k with centre k + 0.5 keeping the box EDGE_MARGIN px inside."""
    h = _half(size)
    lo = int(np.ceil(EDGE_MARGIN + h - 0.5))
    hi = int(np.floor(REF_SIZE - EDGE_MARGIN - h - 0.5))
    return lo, hi


@lru_cache(maxsize=None)
def _position_points(position: str, size: str) -> np.ndarray:
    """(m, 2) centres (px of the 32-px canvas) where ``position`` holds with SAMPLE_SLACK."""
    lo, hi = _k_range(size)
    ks = np.arange(lo, hi + 1) + 0.5
    x, y = np.meshgrid(ks, ks, indexing="xy")
    u, v = x - REF_SIZE / 2, y - REF_SIZE / 2
    s, c = SAMPLE_SLACK, CENTRE_HALF
    region = {
        "centre": np.maximum(abs(u), abs(v)) <= c - s,
        "left": (-u >= c + s) & (-u >= abs(v) + s),
        "right": (u >= c + s) & (u >= abs(v) + s),
        "top": (-v >= c + s) & (-v >= abs(u) + s),
        "bottom": (v >= c + s) & (v >= abs(u) + s),
    }[position]
    pts = np.stack([x[region], y[region]], axis=1)
    if len(pts) == 0:
        raise AssertionError(f"empty sampling region for {position!r}/{size!r}")
    return pts


@lru_cache(maxsize=None)
def _grid(size: str) -> np.ndarray:
    """(m, 2) every allowed centre (px of the 32-px canvas) of an object of ``size``."""
    lo, hi = _k_range(size)
    ks = np.arange(lo, hi + 1) + 0.5
    x, y = np.meshgrid(ks, ks, indexing="xy")
    return np.stack([x.ravel(), y.ravel()], axis=1)


def _relation_ok(rel: str, sub: np.ndarray, anc: np.ndarray) -> np.ndarray:
    """Vectorised relation test with SAMPLE_SLACK px to spare; sub/anc are (..., 2) px."""
    dx = anc[..., 0] - sub[..., 0]
    dy = anc[..., 1] - sub[..., 1]
    primary, secondary = {
        "left of": (dx, dy),
        "right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[rel]
    return primary >= np.abs(secondary) + SAMPLE_SLACK


@lru_cache(maxsize=None)
def _pair_table(sub_size: str, anc_size: str, relation: str) -> np.ndarray:
    """(m_anchor, m_subject) bool: subject grid point j may go with anchor grid point i
    (relation holds with SAMPLE_SLACK and the boxes keep OBJECT_GAP)."""
    anc = _grid(anc_size)[:, None, :]
    sub = _grid(sub_size)[None, :, :]
    need = _half(sub_size) + _half(anc_size) + OBJECT_GAP
    d = np.abs(sub - anc)
    apart = (d[..., 0] >= need) | (d[..., 1] >= need)
    table = apart & _relation_ok(relation, sub, anc)
    table.setflags(write=False)
    return table


@lru_cache(maxsize=None)
def _anchors(sizes: tuple[str, ...], relations: tuple[str, ...]) -> np.ndarray:
    """Anchor grid indices for which every subject has at least one allowed point."""
    ok = np.ones(len(_grid(sizes[1])), dtype=bool)
    for subject, rel in zip((0, 2), relations):
        ok &= _pair_table(sizes[subject], sizes[1], rel).any(axis=1)
    return np.flatnonzero(ok)


def _layout(
    rng: np.random.Generator, sizes: list[str], relations: list[Relation]
) -> np.ndarray | None:
    """Centres (n, 2) in px, or None if this (sizes, relations) cannot be laid out.

    The anchor (object 1) is uniform over grid points that leave every subject a place; then
    object 0, then object 2, each uniform over the grid points that satisfy its relation to
    the anchor and keep the gaps to the objects already placed.
    """
    key_sizes, rels = tuple(sizes), tuple(r.relation for r in relations)
    anchors = _anchors(key_sizes, rels)
    if len(anchors) == 0:
        return None
    for _ in range(_ROUNDS):
        a = int(anchors[int(rng.integers(len(anchors)))])
        first = np.flatnonzero(_pair_table(sizes[0], sizes[1], rels[0])[a])
        p0 = _grid(sizes[0])[first[int(rng.integers(len(first)))]]
        pts = [p0, _grid(sizes[1])[a]]
        if len(sizes) == 3:
            cand = _grid(sizes[2])
            need = _half(sizes[2]) + _half(sizes[0]) + OBJECT_GAP
            d = np.abs(cand - p0)
            ok = _pair_table(sizes[2], sizes[1], rels[1])[a] & (
                (d[:, 0] >= need) | (d[:, 1] >= need)
            )
            third = np.flatnonzero(ok)
            if len(third) == 0:
                continue
            pts.append(cand[third[int(rng.integers(len(third)))]])
        return np.stack(pts)
    return None


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, split: str | None = None) -> Scene:
    """Draw one scene (see docs/world.md, "Sampling" and "Splits").

    Args:
        rng: the generator; the scene is a deterministic function of its state.
        n_objects: 1, 2 or 3; None draws it with weights N_OBJECTS_WEIGHTS.
        split: None (any caption), or "train", "val", "test": scenes whose caption is in another split
            are rejected and redrawn (``relaydiff.world.splits``). Training uses "train".
    Raises:
        ValueError: if ``n_objects`` is not None, 1, 2 or 3, or ``split`` is unknown.
    """
    check_split(split)
    while True:
        scene = _sample_scene(rng, n_objects)
        if split is None or split_of_scene(scene) == split:
            return scene


def _sample_scene(rng: np.random.Generator, n_objects: int | None) -> Scene:
    if n_objects is None:
        n = int(np.searchsorted(_N_CUM, rng.random() * _N_CUM[-1], side="right")) + 1
        n = min(n, MAX_OBJECTS)
    elif n_objects in (1, 2, 3) and not isinstance(n_objects, bool):
        n = int(n_objects)
    else:
        raise ValueError(f"n_objects must be None, 1, 2 or 3, got {n_objects!r}")
    background = _BG_NAMES[int(rng.integers(len(_BG_NAMES)))]
    mention = bool(rng.random() < P_MENTION_BACKGROUND)
    while True:
        ids = rng.choice(len(_IDENTITIES), size=n, replace=False)
        sizes = [_SIZE_NAMES[int(i)] for i in rng.integers(len(_SIZE_NAMES), size=n)]
        if n == 1:
            position = POSITIONS[int(rng.integers(len(POSITIONS)))]
            pts = _position_points(position, sizes[0])
            centres = pts[int(rng.integers(len(pts)))][None, :]
            relations: list[Relation] = []
        else:
            position = None
            rels = rng.integers(len(RELATIONS), size=n - 1)
            relations = [Relation(0, RELATIONS[int(rels[0])], 1)]
            if n == 3:
                relations.append(Relation(2, RELATIONS[int(rels[1])], 1))
            found = _layout(rng, sizes, relations)
            if found is None:
                continue
            centres = found
        objects = tuple(
            Obj(
                shape=_IDENTITIES[int(i)][1],
                colour=_IDENTITIES[int(i)][0],
                size=sz,
                cx=float(c[0]) / REF_SIZE,
                cy=float(c[1]) / REF_SIZE,
            )
            for i, sz, c in zip(ids, sizes, centres)
        )
        return Scene(objects, background, position, tuple(relations), mention)


def sample_prompts(seed: int, n: int, n_objects: int | None = None, split: str | None = None) -> list[str]:
    """``n`` captions of scenes drawn from ``numpy.random.default_rng(seed)`` (from ``split`` only, if given)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, n_objects, split).caption() for _ in range(n)]


def make_batch(
    seed: int, n: int, size: int = REF_SIZE, n_objects: int | None = None, split: str | None = None
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """A rendered training batch, deterministic in ``seed``; ``split="train"`` keeps held-out captions out.

    Returns:
        (images (n, size, size, 3) uint8, captions, scenes); the scenes are the same as
        ``sample_prompts(seed, n, n_objects)`` captions.
    Raises:
        ValueError: for ``n < 0``, a bad ``size`` or ``n_objects``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, n_objects, split) for _ in range(n)]
    images = render_batch(scenes, size)
    return images, [s.caption() for s in scenes], scenes
