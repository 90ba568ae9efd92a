"""Strength predictors: fitted with scikit-learn, saved and read back as JSON, trained on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.preview.edits import EDIT_KINDS, edit_once, sessions
from relaydiff.preview.predictor import REFINE_FEATURES, REUSE_FEATURES, LinearStrength, StrengthPredictors, reuse_features
from relaydiff.world.splits import split_of


def _predictors() -> StrengthPredictors:
    X = [[1.0, 2.0, 0.1], [3.0, 1.0, 0.5], [5.0, 3.0, 0.9], [2.0, 2.0, 0.3]]
    y = [0.2, 0.5, 0.9, 0.3]
    refine = LinearStrength.fit(REFINE_FEATURES, X, y)
    reuse = LinearStrength.fit(REUSE_FEATURES, X, y, lo=0.2)
    return StrengthPredictors(refine, reuse, {"note": "test"})


def test_fit_predicts_in_range_and_json_round_trips(tmp_path: Path) -> None:
    p = _predictors()
    assert p.refine([1.0, 2.0, 0.1]) < p.refine([5.0, 3.0, 0.9])  # follows the labels
    assert all(0.1 <= p.refine([a, 1.0, b]) <= 1.0 for a in (-100, 0, 100) for b in (-10, 10))
    p.save(tmp_path / "p.json")
    q = StrengthPredictors.load(tmp_path / "p.json")
    assert q.refine([3.0, 1.0, 0.5]) == p.refine([3.0, 1.0, 0.5]) and q.reuse == p.reuse


def test_tampered_predictors_are_refused(tmp_path: Path) -> None:
    obj = _predictors().to_json()
    obj["refine"]["coef"] = [1.0, "x", 2.0]
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(RelaydiffError, match="coef"):
        StrengthPredictors.load(tmp_path / "bad.json")
    obj = _predictors().to_json()
    obj["format"] = "pickle"
    (tmp_path / "bad2.json").write_text(json.dumps(obj))
    with pytest.raises(RelaydiffError, match="format is 'pickle'"):
        StrengthPredictors.load(tmp_path / "bad2.json")


def test_sessions_end_on_split_captions_and_edit_one_thing() -> None:
    got = sessions("test", 4, seed=1, min_rounds=3, max_rounds=6)
    assert len(got) == 4
    for s in got:
        assert 3 <= len(s) <= 6 and split_of(s[-1]) == "test" and len(set(s)) == len(s)
    for s in sessions("train", 3, seed=2, min_rounds=2, max_rounds=3, keep_split=True):
        assert all(split_of(c) == "train" for c in s)
    assert "add" in EDIT_KINDS and "remove" in EDIT_KINDS


def test_edit_kinds_apply(tiny_pair) -> None:
    import numpy as np

    from relaydiff.world.grammar import parse_prompt

    spec = parse_prompt("a small red circle left of a large blue square")
    rng = np.random.default_rng(0)
    assert edit_once(spec, "add", rng).n_objects == 3  # type: ignore[union-attr]
    assert edit_once(spec, "remove", rng).n_objects == 1  # type: ignore[union-attr]
    assert edit_once(spec, "position", rng) is None
    _, device = tiny_pair
    near = reuse_features(device, spec.caption(), "a large red circle left of a large blue square")
    same = reuse_features(device, spec.caption(), spec.caption())
    assert same[0] == pytest.approx(0.0, abs=1e-5) and near[0] > same[0]


def test_train_on_a_tiny_budget(tiny_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    from relaydiff.preview import train
    from relaydiff.preview.session import EditConfig
    from relaydiff.preview.train import train_predictors

    monkeypatch.setattr(train, "REFINE_GRID", (0.5, 1.0))  # two grid points keep the test fast
    monkeypatch.setattr(train, "REUSE_GRID", (0.5, 1.0))
    host, device = tiny_pair
    p = train_predictors(host, device, minutes=0.0, config=EditConfig(steps=2, preview_steps=2), min_samples=2)
    assert p.training["train_samples"] >= 2 and p.training["val_samples"] >= 2
    assert 0.1 <= p.refine([6.0, 2.0, 0.4]) <= 1.0 and 0.2 <= p.reuse([0.1, 0.1, 1.0]) <= 1.0
