"""`cache train`: it updates the policy, writes safetensors + JSON, and resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from relaydiff.core.caching.policy import check_policy_for, load_policy
from relaydiff.cache.train import TrainConfig, train
from relaydiff.core.errors import RelaydiffError


def test_train_writes_a_policy_and_resumes(tiny_family: Path, tiny_pair, tmp_path: Path) -> None:
    _, device = tiny_pair
    torch.manual_seed(0)
    from relaydiff.core.caching.policy import SchedulePolicy

    init = SchedulePolicy(hidden=8).state_dict()
    cfg = TrainConfig(out=tmp_path / "reuse", family=tiny_family, max_updates=2, prompts=1, relay_steps=(2,), steps=6,
                      batch=2, group=2, hidden=8)
    info = train(cfg, resume=True)
    assert info["training"]["updates"] == 2 and info["training"]["episodes"] == 4
    policy, pcfg = load_policy(tmp_path / "reuse.json")
    check_policy_for(pcfg, device, "reuse.json")
    assert any(not torch.equal(policy.state_dict()[k], init[k]) for k in init)  # REINFORCE moved the weights
    ckpt = json.loads((tmp_path / "reuse.ckpt.json").read_text())
    assert ckpt["updates"] == 2 and set(ckpt["baselines"]) <= {"2:2", "2:3"}
    resumed = train(TrainConfig(**{**cfg.__dict__, "max_updates": 3}), resume=True)
    assert resumed["training"]["updates"] == 3 and resumed["training"]["episodes"] == 6
    fresh = train(TrainConfig(**{**cfg.__dict__, "max_updates": 1}), resume=False)
    assert fresh["training"]["updates"] == 1


def test_train_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(RelaydiffError, match=r"training relay steps \[23\] must lie in \[0, 22\]"):
        TrainConfig(out=tmp_path / "p", relay_steps=(23,))
    with pytest.raises(RelaydiffError, match="unknown cache mechanism"):
        TrainConfig(out=tmp_path / "p", mechanism="nope")


def test_training_prompts_come_from_the_train_split(tiny_pair, tmp_path: Path) -> None:
    """No val or test caption is trained on (the committed policies before 2026-12-02 were trained on test captions)."""
    from relaydiff.cache.train import prepare_contexts
    from relaydiff.world.splits import split_of

    host, device = tiny_pair
    cfg = TrainConfig(out=tmp_path / "p", prompts=3, relay_steps=(2,), steps=6)
    contexts = prepare_contexts(host, device, cfg)
    assert len(contexts) == 3 and {split_of(c.prompt) for c in contexts} == {"train"}
    assert cfg.noise_seed >= 2**40  # the seeds training runs use (relaydiff.world.splits), not the val/test ones


def test_attribute_weight_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(RelaydiffError, match=r"attribute weight -1.0 must lie in \[0, 10\]"):
        TrainConfig(out=tmp_path / "p", attribute_weight=-1.0)
