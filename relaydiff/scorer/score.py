"""Score an image against a prompt: does it show what the prompt asks for?"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from relaydiff.scorer.detect import Detection, detect, detect_background
from relaydiff.world.grammar import parse_prompt
from relaydiff.world.scene import ObjSpec, PromptSpec, position_holds, relation_holds


@dataclass(frozen=True)
class ObjectCheck:
    """The checks of one requested object against the detection matched to it."""

    spec: ObjSpec  # what the prompt asked for
    detection: Detection | None  # the matched blob of the requested colour, if any
    found: bool  # a blob of the requested colour was matched
    shape_correct: bool
    size_correct: bool


@dataclass(frozen=True)
class ScoreResult:
    """Per-item checks of one (image, prompt) pair; see docs/world.md, "Scoring"."""

    prompt: str
    spec: PromptSpec
    objects: tuple[ObjectCheck, ...]
    position_correct: bool | None  # None when the prompt states no position
    relations_correct: tuple[bool, ...]  # one per relation of the prompt
    background_correct: bool | None  # None when the prompt does not name the background
    count_correct: bool  # as many blobs as requested objects
    background: str  # detected background
    detections: tuple[Detection, ...]
    checks: tuple[tuple[str, bool], ...]  # every check, named, in a fixed order
    attribute_accuracy: float  # fraction of checks passed
    correct: bool  # all checks passed ("prompt accuracy" counts these)


def _checks(
    spec: PromptSpec,
    dets: list[Detection],
    assign: tuple[int | None, ...],
) -> tuple[list[ObjectCheck], bool | None, list[bool]]:
    objs = []
    for o, k in zip(spec.objects, assign):
        d = None if k is None else dets[k]
        objs.append(
            ObjectCheck(
                spec=o,
                detection=d,
                found=d is not None,
                shape_correct=d is not None and d.shape == o.shape,
                size_correct=d is not None and d.size == o.size,
            )
        )
    position = None
    if spec.position is not None:
        d0 = objs[0].detection
        position = d0 is not None and position_holds(spec.position, *d0.centre)
    rels = []
    for r in spec.relations:
        a, b = objs[r.subject].detection, objs[r.anchor].detection
        ok = a is not None and b is not None and relation_holds(r.relation, a.centre, b.centre)
        rels.append(ok)
    return objs, position, rels


def _passed(objs: list[ObjectCheck], position: bool | None, rels: list[bool]) -> int:
    n = sum(o.found + o.shape_correct + o.size_correct for o in objs)
    return n + bool(position) + sum(rels)


def score(image: np.ndarray, prompt: str) -> ScoreResult:
    """Check ``image`` against every attribute ``prompt`` states.

    Each requested object is matched to a distinct detected blob of its colour; among all
    such matchings the one passing the most checks is used (the image gets the benefit of
    the doubt). Checks: per object found / shape / size; position; each relation; the
    background when named; and that the number of blobs equals the number of objects.

    Args:
        image: (N, N, 3) RGB, uint8 or float in 0..255.
        prompt: a caption of the world grammar.
    Raises:
        ValueError: quoting the prompt if it is outside the grammar, or for a bad image.
    """
    spec = parse_prompt(prompt)
    dets = detect(image)
    bg = detect_background(image)
    options = [
        [None] + [k for k, d in enumerate(dets) if d.colour == o.colour] for o in spec.objects
    ]
    best: tuple[int, list[ObjectCheck], bool | None, list[bool]] | None = None
    for assign in itertools.product(*options):
        used = [k for k in assign if k is not None]
        if len(used) != len(set(used)):
            continue
        objs, position, rels = _checks(spec, dets, assign)
        passed = _passed(objs, position, rels)
        if best is None or passed > best[0]:
            best = (passed, objs, position, rels)
    assert best is not None  # the all-None assignment is always valid
    _, objs, position, rels = best
    background_ok = None if spec.background is None else bg == spec.background
    count_ok = len(dets) == len(spec.objects)

    checks: list[tuple[str, bool]] = []
    for i, o in enumerate(objs):
        checks += [
            (f"object{i}.found", o.found),
            (f"object{i}.shape", o.shape_correct),
            (f"object{i}.size", o.size_correct),
        ]
    if position is not None:
        checks.append(("position", position))
    checks += [(f"relation{j}", ok) for j, ok in enumerate(rels)]
    if background_ok is not None:
        checks.append(("background", background_ok))
    checks.append(("count", count_ok))
    passed = sum(ok for _, ok in checks)
    return ScoreResult(
        prompt=prompt,
        spec=spec,
        objects=tuple(objs),
        position_correct=position,
        relations_correct=tuple(rels),
        background_correct=background_ok,
        count_correct=count_ok,
        background=bg,
        detections=tuple(dets),
        checks=tuple(checks),
        attribute_accuracy=passed / len(checks),
        correct=passed == len(checks),
    )


def summarize(results: list[ScoreResult]) -> dict[str, float]:
    """Mean prompt accuracy (all checks pass) and mean attribute accuracy over ``results``."""
    if not results:
        raise ValueError("summarize needs at least one result, got an empty list")
    return {
        "n": float(len(results)),
        "prompt_accuracy": float(np.mean([r.correct for r in results])),
        "attribute_accuracy": float(np.mean([r.attribute_accuracy for r in results])),
    }
