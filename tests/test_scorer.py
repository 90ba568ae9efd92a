"""The classical scorer: accurate on ground-truth renders, robust to mild degradation, and
able to fail (wrong prompts are caught)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from relaydiff.scorer import ScoreResult, detect, detect_background, score, summarize
from relaydiff.world import (
    BACKGROUNDS,
    PALETTE,
    POSITIONS,
    SHAPES,
    Obj,
    PromptSpec,
    Relation,
    Scene,
    make_batch,
    render,
)

_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, list[str], list[Scene]]:
    return make_batch(2024, 500)


def _degrade(images: np.ndarray, sigma: float, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0))
    f += rng.normal(0.0, noise, f.shape)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


def _mutate(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """Change one stated attribute so that the true image no longer matches."""
    kind = int(rng.integers(4))
    if kind == 3:
        if spec.position is not None:
            others = [p for p in POSITIONS if p != spec.position]
            return dataclasses.replace(spec, position=others[int(rng.integers(len(others)))])
        rels = list(spec.relations)
        j = int(rng.integers(len(rels)))
        rels[j] = Relation(rels[j].subject, _FLIP[rels[j].relation], rels[j].anchor)
        return dataclasses.replace(spec, relations=tuple(rels))
    objs = list(spec.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    used = {(x.colour, x.shape) for x in objs}
    if kind == 0:
        colours = [c for c in PALETTE if (c, o.shape) not in used]
        o = dataclasses.replace(o, colour=colours[int(rng.integers(len(colours)))])
    elif kind == 1:
        shapes = [s for s in SHAPES if (o.colour, s) not in used]
        o = dataclasses.replace(o, shape=shapes[int(rng.integers(len(shapes)))])
    else:
        o = dataclasses.replace(o, size="large" if o.size == "small" else "small")
    objs[i] = o
    return dataclasses.replace(spec, objects=tuple(objs))


def test_ground_truth_renders_score_high(batch) -> None:  # type: ignore[no-untyped-def]
    images, captions, scenes = batch
    assert {s.n_objects for s in scenes} == {1, 2, 3}
    results = [score(im, c) for im, c in zip(images, captions)]
    summary = summarize(results)
    print(f"ground truth 32px: {summary}")
    assert summary["attribute_accuracy"] >= 0.98
    assert summary["prompt_accuracy"] >= 0.95


def test_ground_truth_renders_at_64_px() -> None:
    images, captions, _ = make_batch(77, 60, size=64)
    summary = summarize([score(im, c) for im, c in zip(images, captions)])
    print(f"ground truth 64px: {summary}")
    assert summary["attribute_accuracy"] >= 0.98


def test_wrong_prompts_are_caught(batch) -> None:  # type: ignore[no-untyped-def]
    images, _, scenes = batch
    images, scenes = images[:300], scenes[:300]
    rng = np.random.default_rng(3)
    wrong = [_mutate(s.spec(), rng) for s in scenes]
    assert all(w != s.spec() for w, s in zip(wrong, scenes))
    caught = np.mean([not score(im, w.caption()).correct for im, w in zip(images, wrong)])
    print(f"wrong prompts caught: {caught:.3f}")
    assert caught >= 0.95


def test_wrong_background_is_caught(batch) -> None:  # type: ignore[no-untyped-def]
    images, _, scenes = batch
    for im, s in list(zip(images, scenes))[:50]:
        other = next(b for b in BACKGROUNDS if b != s.background)
        r = score(im, dataclasses.replace(s.spec(), background=other).caption())
        assert r.background_correct is False and not r.correct


def test_mildly_degraded_renders_still_score_high(batch) -> None:  # type: ignore[no-untyped-def]
    images, captions, _ = batch
    degraded = _degrade(images[:300], sigma=0.7, noise=8.0)
    summary = summarize([score(im, c) for im, c in zip(degraded, captions)])
    print(f"degraded (blur 0.7, noise 8): {summary}")
    assert summary["attribute_accuracy"] >= 0.95


def test_detect_reads_a_hand_built_scene() -> None:
    scene = Scene(
        objects=(
            Obj("triangle", "orange", "large", 8.5 / 32, 16.5 / 32),
            Obj("diamond", "cyan", "small", 24.5 / 32, 15.5 / 32),
        ),
        background="white",
        position=None,
        relations=(Relation(0, "left of", 1),),
    )
    img = render(scene)
    dets = detect(img)
    assert [(d.colour, d.shape, d.size) for d in dets] == [
        ("orange", "triangle", "large"),
        ("cyan", "diamond", "small"),
    ]
    tri = dets[0]
    assert tri.bbox == (2, 10, 15, 23) and tri.area == pytest.approx(85.0)
    assert tri.centre == pytest.approx((8.5 / 32, 16.5 / 32), abs=0.5 / 32)
    assert detect_background(img) == "white"
    r = score(img, scene.caption())
    assert r.correct and r.attribute_accuracy == 1.0
    assert len(r.checks) == scene.complexity + 1  # + the object count check
    assert r.relations_correct == (True,) and r.count_correct


def test_score_result_on_an_empty_image() -> None:
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    assert detect(blank) == []
    r: ScoreResult = score(blank, "a small red circle on the left on a black background")
    assert not r.correct and r.background_correct is True
    assert not r.objects[0].found and r.position_correct is False
    assert r.attribute_accuracy == pytest.approx(1 / 6)  # only the background check passes


def test_extra_object_fails_the_count_check() -> None:
    scene = Scene(
        (Obj("square", "red", "large", 8.5 / 32, 16.5 / 32),
         Obj("circle", "blue", "small", 24.5 / 32, 16.5 / 32)),
        "gray",
        None,
        (Relation(0, "left of", 1),),
    )
    r = score(render(scene), "a large red square on the left")
    assert r.objects[0].found and r.position_correct and not r.count_correct and not r.correct


def test_bad_inputs_raise() -> None:
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="'a tiny red circle'"):
        score(img, "a tiny red circle")
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        detect(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        summarize([])
