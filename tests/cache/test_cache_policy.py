"""The learned schedule's policy: Plackett-Luce draws, top-B masks, files and the family check."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from relaydiff.core.caching.policy import (
    FEATURES,
    PolicyConfig,
    SchedulePolicy,
    check_policy_for,
    load_policy,
    sample_mask,
    save_policy,
    step_features,
    top_b_mask,
    unet_identity,
)
from relaydiff.core.errors import RelaydiffError


def test_plackett_luce_log_probs_sum_to_one_over_all_ordered_draws() -> None:
    scores = torch.tensor([0.0, 0.3, -1.2, 2.0, 0.5])
    budget = 3  # step 0 plus two of the four candidates
    gen = torch.Generator().manual_seed(0)
    seen: dict[tuple[int, ...], float] = {}
    for _ in range(400):
        mask, logp = sample_mask(scores, budget, gen)
        assert int(mask.sum()) == budget and bool(mask[0])
        seen[tuple(mask.nonzero().flatten().tolist())] = float(logp)
    # total probability of every ordered draw of 2 of the 4 candidates, computed by the same formula
    cand = scores[1:]
    total = 0.0
    for a, b in itertools.permutations(range(4), 2):
        pa = torch.softmax(cand, 0)[a]
        rest = [i for i in range(4) if i != a]
        pb = torch.softmax(cand[rest], 0)[rest.index(b)]
        total += float(pa * pb)
    assert total == pytest.approx(1.0, abs=1e-6)
    assert len(seen) >= 4  # the draw explores several sets


def test_sampling_favours_high_scores_and_gradients_flow() -> None:
    scores = torch.tensor([0.0, 5.0, -5.0, -5.0], requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    picks = [int(sample_mask(scores, 2, gen)[0][1]) for _ in range(200)]
    assert sum(picks) > 190
    _, logp = sample_mask(scores, 2, gen)
    logp.backward()
    assert scores.grad is not None and bool(scores.grad.abs().sum() > 0)


def test_top_b_mask() -> None:
    scores = torch.tensor([-9.0, 1.0, 3.0, 2.0, 0.0])
    assert top_b_mask(scores, 1).tolist() == [True, False, False, False, False]
    assert top_b_mask(scores, 3).tolist() == [True, False, True, True, False]


def test_step_features_shape_and_range(tiny_pair) -> None:
    from relaydiff.core.schedulers import build_scheduler

    _, device = tiny_pair
    sch = build_scheduler("ddim", device.scheduler_config)
    sch.set_timesteps(10)
    f = step_features(sch.timesteps, 4, 3, device.scheduler_config)
    assert f.shape == (6, len(FEATURES))
    assert torch.allclose(f[:, 0], torch.full((6,), 0.5))
    assert f[:, 6].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # the uniform schedule of B = 3 in m = 6
    assert bool((f[1:, 1] > f[:-1, 1]).all()) and bool((f[:, 5] > 0).all())  # log SNR rises as noise is removed


def _config(device, **over) -> PolicyConfig:  # type: ignore[no-untyped-def]
    cfg_hash, w_hash = unet_identity(device)
    base = dict(family_id=device.family_id, unet_config_hash=cfg_hash, unet_weights_hash=w_hash, mechanism="reuse", cache_branch=0)
    base.update(over)
    return PolicyConfig(**base)  # type: ignore[arg-type]


def test_save_load_roundtrip_and_family_check(tiny_pair, tmp_path: Path) -> None:
    _, device = tiny_pair
    policy = SchedulePolicy(hidden=8)
    save_policy(tmp_path / "p", policy, _config(device, hidden=8))
    loaded, cfg = load_policy(tmp_path / "p.json")
    x = torch.randn(5, len(FEATURES))
    assert torch.equal(loaded(x), policy(x))
    check_policy_for(cfg, device, "p.json")
    save_policy(tmp_path / "other", policy, _config(device, hidden=8, family_id="othershapes-000000000000"))
    _, other = load_policy(tmp_path / "other.safetensors")
    with pytest.raises(RelaydiffError, match=r"trained for family 'othershapes-000000000000'; the device model is family"):
        check_policy_for(other, device, "other.json")
    save_policy(tmp_path / "arch", policy, _config(device, hidden=8, unet_config_hash="0" * 16))
    with pytest.raises(RelaydiffError, match="config hash '0000000000000000'"):
        check_policy_for(load_policy(tmp_path / "arch")[1], device, "arch.json")


def test_malformed_policy_files_are_refused(tiny_pair, tmp_path: Path) -> None:
    _, device = tiny_pair
    save_policy(tmp_path / "p", SchedulePolicy(hidden=8), _config(device, hidden=8))
    raw = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps({**raw, "hidden": 16}))
    with pytest.raises(RelaydiffError, match="a policy with hidden=16 needs"):
        load_policy(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({**raw, "format": "something-else"}))
    with pytest.raises(RelaydiffError, match="is not a cache policy: format 'something-else'"):
        load_policy(tmp_path / "p.json")
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(RelaydiffError, match="is not valid JSON"):
        load_policy(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps(raw))
    (tmp_path / "p.safetensors").write_bytes(b"garbage")
    with pytest.raises(RelaydiffError, match="not a readable safetensors file"):
        load_policy(tmp_path / "p.json")
    with pytest.raises(RelaydiffError, match="cache policy file not found"):
        load_policy(tmp_path / "missing.json")
