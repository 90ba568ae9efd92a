"""The procedural world: determinism, grammar round trip, geometry and exact pixels."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from relaydiff.world import (
    BACKGROUNDS,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    ObjSpec,
    PromptSpec,
    Relation,
    Scene,
    make_batch,
    object_mask,
    parse_prompt,
    position_holds,
    relation_holds,
    render,
    sample_prompts,
    sample_scene,
    vocabulary,
)
from relaydiff.world.vocab import EDGE_MARGIN, OBJECT_GAP, REF_SIZE


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(11)
    return [sample_scene(rng) for _ in range(600)]


def test_make_batch_is_deterministic_in_seed() -> None:
    a_img, a_cap, a_sc = make_batch(5, 64)
    b_img, b_cap, b_sc = make_batch(5, 64)
    c_img, c_cap, _ = make_batch(6, 64)
    assert a_img.shape == (64, 32, 32, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    assert a_cap != c_cap and not np.array_equal(a_img, c_img)
    assert sample_prompts(5, 64) == a_cap
    assert a_cap == [s.caption() for s in a_sc]


def test_make_batch_at_64_px_draws_the_same_scenes() -> None:
    img32, cap32, sc32 = make_batch(3, 20)
    img64, cap64, sc64 = make_batch(3, 20, size=64)
    assert img64.shape == (20, 64, 64, 3) and cap32 == cap64 and sc32 == sc64
    for s, im in zip(sc64, img64):
        assert np.array_equal(render(s, 64), im)


def test_n_objects_is_respected_and_weighted(scenes: list[Scene]) -> None:
    for k in (1, 2, 3):
        _, _, sc = make_batch(1, 30, n_objects=k)
        assert all(s.n_objects == k for s in sc)
    counts = Counter(s.n_objects for s in scenes)
    assert set(counts) == {1, 2, 3}
    assert 0.2 < counts[1] / len(scenes) < 0.4 and 0.3 < counts[2] / len(scenes) < 0.5
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match=repr(bad)):
            sample_scene(np.random.default_rng(0), bad)  # type: ignore[arg-type]


def test_caption_parse_round_trip(scenes: list[Scene]) -> None:
    for s in scenes:
        spec = parse_prompt(s.caption())
        assert spec == s.spec()
        assert spec.caption() == s.caption()
        assert spec.n_objects == s.n_objects and spec.complexity == s.complexity
    assert parse_prompt("  A Small RED circle   on the left ") == parse_prompt(
        "a small red circle on the left"
    )


def test_vocabulary_is_exactly_the_words_captions_use() -> None:
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(w.isalpha() and w.islower() for w in vocab)
    used = Counter(w for c in sample_prompts(0, 3000) for w in c.split())
    assert set(used) == set(vocab)
    assert set(PALETTE) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) <= set(vocab)


def test_objects_inside_canvas_apart_and_exact_pixels(scenes: list[Scene]) -> None:
    allowed = {tuple(c) for c in (*PALETTE.values(), *BACKGROUNDS.values())}
    for s in scenes[:100]:
        for size in (32, 64):
            img = render(s, size)
            px = img.reshape(-1, 3)
            assert {tuple(int(v) for v in p) for p in np.unique(px, axis=0)} <= allowed
            masks = [object_mask(o, size) for o in s.objects]
            for o, m in zip(s.objects, masks):
                # every object pixel has the object's exact colour (no overlap, no antialiasing)
                assert m.any() and (img[m] == PALETTE[o.colour]).all()
            covered = np.any(masks, axis=0)
            assert (img[~covered] == BACKGROUNDS[s.background]).all()
        for o in s.objects:  # bounding box EDGE_MARGIN px inside the 32-px canvas
            h = SIZES[o.size] / 2
            for c in (o.cx * REF_SIZE, o.cy * REF_SIZE):
                assert EDGE_MARGIN + h <= c <= REF_SIZE - EDGE_MARGIN - h
        for a, b in itertools.combinations(s.objects, 2):  # OBJECT_GAP px between boxes
            need = (SIZES[a.size] + SIZES[b.size]) / 2 + OBJECT_GAP
            dx, dy = abs(a.cx - b.cx) * REF_SIZE, abs(a.cy - b.cy) * REF_SIZE
            assert dx >= need or dy >= need


def test_stated_layout_holds(scenes: list[Scene]) -> None:
    seen_pos, seen_rel = set(), set()
    for s in scenes:
        if s.position is not None:
            o = s.objects[0]
            assert position_holds(s.position, o.cx, o.cy)
            assert [p for p in POSITIONS if position_holds(p, o.cx, o.cy)] == [s.position]
            seen_pos.add(s.position)
        for r in s.relations:
            a, b = s.objects[r.subject], s.objects[r.anchor]
            assert relation_holds(r.relation, (a.cx, a.cy), (b.cx, b.cy))
            assert [q for q in RELATIONS if relation_holds(q, (a.cx, a.cy), (b.cx, b.cy))] == [
                r.relation
            ]
            seen_rel.add(r.relation)
        assert len({(o.colour, o.shape) for o in s.objects}) == s.n_objects
    assert seen_pos == set(POSITIONS) and seen_rel == set(RELATIONS)


def test_shape_pixel_counts_golden() -> None:
    c = 0.5 + 0.5 / 32  # a pixel centre of the 32-px canvas
    counts = {
        (shape, size, n): int(object_mask(Obj(shape, "red", size, c, c), n).sum())
        for shape in SHAPES
        for size in SIZES
        for n in (32, 64)
    }
    assert counts[("square", "small", 32)] == 49 and counts[("square", "large", 32)] == 169
    assert counts[("circle", "small", 32)] == 37
    assert counts[("triangle", "small", 32)] == 25 and counts[("diamond", "small", 32)] == 25
    assert counts[("square", "small", 64)] == 196 and counts[("square", "large", 64)] == 676
    for shape in SHAPES:
        assert counts[(shape, "large", 32)] > 2 * counts[(shape, "small", 32)]


def test_complexity_values() -> None:
    cases = {
        "a small red circle on the left": 4,
        "a small red circle on the left on a white background": 5,
        "a large blue square above a small red circle": 7,
        "a large blue square above a small red circle on a black background": 8,
        "a small red circle left of a large blue square and a small green triangle above it": 11,
        "a small red circle left of a large blue square and a small red triangle below it "
        "on a gray background": 12,
    }
    for text, want in cases.items():
        spec = parse_prompt(text)
        assert spec.complexity == want, text
        assert spec.caption() == text
    spec = parse_prompt("a large blue square above a small red circle")
    assert spec == PromptSpec(
        objects=(ObjSpec("square", "blue", "large"), ObjSpec("circle", "red", "small")),
        background=None,
        position=None,
        relations=(Relation(0, "above", 1),),
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle on the left",  # no size
        "a small red circle",  # no position
        "a small red circle on the left on a red background",  # object colour as background
        "a small pink circle on the left",
        "a small red hexagon on the left",
        "a small red circle on the left please",
        "a small red circle left of a large red circle",  # same (colour, shape)
        "a small red circle left of it",
        "a small red circle left of a large blue square and a small green triangle above",
        "a small red circle in the center",
    ],
)
def test_bad_prompt_raises_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="outside the world grammar") as info:
        parse_prompt(text)
    assert repr(text) in str(info.value)


def test_records_validate_themselves() -> None:
    with pytest.raises(ValueError, match="'hexagon'"):
        Obj("hexagon", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="1.5"):
        Obj("circle", "red", "small", 1.5, 0.5)
    o = Obj("circle", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="'pink'"):
        Scene((o,), "pink", "left")
    with pytest.raises(ValueError, match="position"):
        Scene((o,), "black", None)
    with pytest.raises(ValueError, match="differ"):
        Scene((o, o), "black", None, (Relation(0, "above", 1),))
    with pytest.raises(ValueError, match="'near'"):
        Relation(0, "near", 1)
    with pytest.raises(ValueError, match="17"):
        render(Scene((o,), "black", "centre"), size=17.0)  # type: ignore[arg-type]


# --- held-out splits ------------------------------------------------------------------------------


def test_split_is_a_fixed_function_of_the_scene_phrase() -> None:
    from relaydiff.world import scene_phrase, split_of

    caption = "a small blue square left of a large green triangle on a gray background"
    assert scene_phrase(caption) == "a small blue square left of a large green triangle"
    assert split_of(caption) == split_of("a small blue square left of a large green triangle")
    assert split_of("  A small blue square LEFT of a large green triangle ") == split_of(caption)
    # Golden buckets: a change of hash or key would silently move captions between splits.
    from relaydiff.world.splits import bucket_of

    assert [bucket_of(c) for c in ("a large red circle on the left", "a small blue square in the centre")] == [67, 2]
    assert bucket_of("a large red circle on the left on a black background") == 67


def test_split_shares_of_one_object_phrases() -> None:
    from relaydiff.world import PALETTE, POSITION_PHRASES, SHAPES, SIZES, split_of

    counts: dict[str, int] = {}
    for size in SIZES:
        for colour in PALETTE:
            for shape in SHAPES:
                for pos in POSITION_PHRASES.values():
                    s = split_of(f"a {size} {colour} {shape} {pos}")
                    counts[s] = counts.get(s, 0) + 1
    assert sum(counts.values()) == 280
    assert 15 <= counts["test"] <= 45 and 15 <= counts["val"] <= 45  # about 10% each


@pytest.mark.parametrize("n_objects", [1, 2, 3])
def test_training_batches_never_draw_held_out_captions(n_objects: int) -> None:
    from relaydiff.world import split_of

    _, captions, _ = make_batch(5, 400, n_objects=n_objects, split="train")
    assert {split_of(c) for c in captions} == {"train"}
    _, all_captions, _ = make_batch(5, 400, n_objects=n_objects)  # unrestricted sampling does reach them
    assert {split_of(c) for c in all_captions} == {"train", "val", "test"}


def test_split_prompts_are_deterministic_disjoint_and_in_their_split() -> None:
    from relaydiff.world import split_of, split_prompts

    for n_objects in (1, 2, 3):
        test = split_prompts("test", 60, n_objects)
        val = split_prompts("val", 60, n_objects)
        assert test == split_prompts("test", 60, n_objects)
        assert len(set(test)) == 60 and {split_of(c) for c in test} == {"test"}
        assert {split_of(c) for c in val} == {"val"}
        assert not set(test) & set(val)
        assert test != split_prompts("test", 60, n_objects, seed=1)


def test_split_prompts_repeat_when_the_split_has_too_few_captions() -> None:
    from relaydiff.world import split_prompts

    prompts = split_prompts("test", 400, 1)  # about 116 distinct 1-object test captions exist
    distinct = list(dict.fromkeys(prompts))
    assert 60 < len(distinct) < 200
    assert prompts[len(distinct)] == distinct[0]


def test_noise_seeds_of_splits_are_disjoint() -> None:
    from relaydiff.world import noise_seed

    assert noise_seed("test", 0) != noise_seed("val", 0)
    assert max(noise_seed("test", i) for i in range(1000)) < noise_seed("val", 0)
    with pytest.raises(ValueError, match="'train'"):
        noise_seed("train", 0)


def test_bad_split_names_the_value() -> None:
    with pytest.raises(ValueError, match="'tset'"):
        make_batch(0, 2, split="tset")
