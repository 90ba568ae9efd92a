"""``preview train``'s pairs: shuffled over 1-, 2- and 3-object final prompts, train and val apart, never the test split."""

from __future__ import annotations

import itertools

import pytest

from relaydiff.evaluate import eval_noise_seed
from relaydiff.preview.train import TRAIN_NOISE_SEED, _object_counts, _pairs
from relaydiff.world.splits import split_of


def test_a_budget_prefix_mixes_object_counts() -> None:
    first = list(itertools.islice(_pairs("train", 0), 9))  # what a short time budget measures
    counts = _object_counts([final for _, final, _ in first])
    assert sum(1 for v in counts.values() if v) == 3, counts  # session 7's first pairs were all 1-object
    assert all(split_of(p) == "train" and split_of(f) == "train" for p, f, _ in first)
    assert [seed for _, _, seed in first] == [TRAIN_NOISE_SEED + i for i in range(9)]


def test_val_pairs_use_val_captions_and_seeds() -> None:
    first = list(itertools.islice(_pairs("val", 0), 6))
    assert all(split_of(p) == "val" and split_of(f) == "val" for p, f, _ in first)
    assert [seed for _, _, seed in first] == [eval_noise_seed("val", 0, i) for i in range(6)]
    with pytest.raises(ValueError, match="not 'test'"):
        next(_pairs("test", 0))
