"""Editing sessions from the world grammar: each round changes one attribute, adds or removes an object.

A session is built backwards from its final prompt (drawn from a split), so the final prompt of a
test session is a test caption: :func:`edit_session` walks ``rounds - 1`` random edits away from it
and reverses the walk. ``keep_split`` rejects walks that pass through a caption of another split
(training sessions must not see a validation or test caption, even as an earlier round).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from relaydiff.world.scene import ObjSpec, PromptSpec, Relation
from relaydiff.world.splits import split_of
from relaydiff.world.vocab import BACKGROUNDS, PALETTE, POSITIONS, RELATIONS, SHAPES, SIZES

EDIT_KINDS = ("colour", "shape", "size", "position", "relation", "background", "add", "remove")


def _with_object(spec: PromptSpec, i: int, obj: ObjSpec) -> PromptSpec:
    objs = list(spec.objects)
    objs[i] = obj
    return replace(spec, objects=tuple(objs))


def edit_once(spec: PromptSpec, kind: str, rng: np.random.Generator) -> PromptSpec | None:
    """``spec`` with one edit of ``kind``, or None when that edit does not apply (or breaks the grammar)."""
    n = spec.n_objects
    i = int(rng.integers(n))
    o = spec.objects[i]
    try:
        if kind == "colour":
            return _with_object(spec, i, replace(o, colour=str(rng.choice([c for c in PALETTE if c != o.colour]))))
        if kind == "shape":
            return _with_object(spec, i, replace(o, shape=str(rng.choice([s for s in SHAPES if s != o.shape]))))
        if kind == "size":
            return _with_object(spec, i, replace(o, size=next(s for s in SIZES if s != o.size)))
        if kind == "position":
            if n != 1:
                return None
            return replace(spec, position=str(rng.choice([p for p in POSITIONS if p != spec.position])))
        if kind == "relation":
            if n == 1:
                return None
            j = int(rng.integers(len(spec.relations)))
            rels = list(spec.relations)
            rels[j] = replace(rels[j], relation=str(rng.choice([r for r in RELATIONS if r != rels[j].relation])))
            return replace(spec, relations=tuple(rels))
        if kind == "background":
            options: list[str | None] = [b for b in BACKGROUNDS if b != spec.background]
            if spec.background is not None:
                options.append(None)
            return replace(spec, background=options[int(rng.integers(len(options)))])
        if kind == "add":
            if n == 3:
                return None
            new = ObjSpec(str(rng.choice(SHAPES)), str(rng.choice(list(PALETTE))), str(rng.choice(list(SIZES))))
            rel = str(rng.choice(RELATIONS))
            if n == 1:
                return PromptSpec((new, o), spec.background, None, (Relation(0, rel, 1),))
            return PromptSpec((*spec.objects, new), spec.background, None, (*spec.relations, Relation(2, rel, 1)))
        if kind == "remove":
            if n == 1:
                return None
            if n == 3:
                return PromptSpec(spec.objects[:2], spec.background, None, spec.relations[:1])
            return PromptSpec((spec.objects[1],), spec.background, str(rng.choice(POSITIONS)), ())
    except ValueError:  # e.g. two objects with the same (colour, shape)
        return None
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def edit_session(final: PromptSpec, rounds: int, rng: np.random.Generator, *, keep_split: str | None = None) -> list[str]:
    """``rounds`` captions ending with ``final``'s, each one edit from the one before.

    Raises:
        ValueError: ``rounds`` < 1, or no walk found in 200 tries (with ``keep_split``).
    """
    if rounds < 1:
        raise ValueError(f"a session has at least 1 round, got {rounds!r}")
    for _ in range(200):
        walk = [final]
        while len(walk) < rounds:
            nxt = edit_once(walk[-1], str(rng.choice(EDIT_KINDS)), rng)
            if nxt is not None and nxt.caption() not in {w.caption() for w in walk}:
                walk.append(nxt)
        captions = [w.caption() for w in reversed(walk)]
        if keep_split is None or all(split_of(c) == keep_split for c in captions):
            return captions
    raise ValueError(f"no {rounds}-round walk from {final.caption()!r} stays in split {keep_split!r}")


def sessions(split: str, n: int, *, seed: int = 0, min_rounds: int = 3, max_rounds: int = 6,
             keep_split: bool = False) -> list[list[str]]:
    """``n`` sessions whose final prompts are ``split`` captions (1-3 objects in turn), of min..max rounds."""
    from relaydiff.world.grammar import parse_prompt
    from relaydiff.world.splits import split_prompts

    rng = np.random.default_rng([0x5E55, seed])
    finals: list[str] = []
    for k in (1, 2, 3):
        finals += split_prompts(split, (n + 3 - k) // 3, k, seed=seed)
    out = []
    for caption in finals[:n]:
        rounds = int(rng.integers(min_rounds, max_rounds + 1))
        out.append(edit_session(parse_prompt(caption), rounds, rng, keep_split=split if keep_split else None))
    return out
