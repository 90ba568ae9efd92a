"""Bad context values, arms, rewards and state files fail with a BanditError quoting the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.bandit import Arm, BanditConfig, BanditContext, BanditError, BanditPolicy, reward

GOOD = dict(complexity=6.0, quality_weight=0.5, rtt_s=0.05, bandwidth_mbit_s=20.0, host_queue=0.0,
            host_utilisation=0.0, device_steps_per_second=1.0, device_load=0.0, steps=25)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("complexity", float("nan"), "finite number"),
    ("rtt_s", -0.1, "[0, 3600]"),
    ("quality_weight", 1.5, "[0, 1]"),
    ("bandwidth_mbit_s", 0.0, "(0, 1e+06]"),
    ("device_load", "high", "a number"),
    ("host_queue", float("inf"), "finite number"),
    ("device_steps_per_second", True, "a number"),
])
def test_bad_context_value(name: str, value: object, expected: str) -> None:
    with pytest.raises(BanditError) as info:
        BanditContext(**{**GOOD, name: value})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, RelaydiffError)
    assert f"context {name} is {value!r}" in str(info.value) and expected in str(info.value)


def test_unknown_variant_and_arm() -> None:
    policy = BanditPolicy(BanditConfig(variants=("fp32", "int8")))
    ctx = BanditContext(**GOOD)  # type: ignore[arg-type]
    with pytest.raises(BanditError, match=r"device variant is 'distilled'; expected one of \['fp32', 'int8'\]"):
        policy.choose_arm(ctx, variants=("distilled",))
    with pytest.raises(BanditError, match="device variant is 'gpu'"):
        policy.record(ctx, Arm(0.5, "gpu"), 0.5)
    with pytest.raises(BanditError, match="relay fraction is 0.4; expected one of"):
        policy.record(ctx, Arm(0.4, "fp32"), 0.5)
    with pytest.raises(BanditError, match="reward is 1.2"):
        policy.record(ctx, Arm(0.5, "fp32"), 1.2)


def test_bad_reward_inputs_and_config() -> None:
    with pytest.raises(BanditError, match="latency_s is -1"):
        reward(0.5, -1, 0.5, 10.0)
    with pytest.raises(BanditError, match="quality_weight is 2"):
        reward(0.5, 1.0, 2, 10.0)
    with pytest.raises(BanditError, match="BanditConfig.fractions item is 1.5"):
        BanditConfig(fractions=(0.0, 1.5))
    with pytest.raises(BanditError, match="BanditConfig.variants item is 'FP 32'"):
        BanditConfig(variants=("FP 32",))


def test_bad_state_files(tmp_path: Path) -> None:
    with pytest.raises(BanditError, match="bandit state file not found"):
        BanditPolicy.load(tmp_path / "missing.json")
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x04\x95\x00")
    with pytest.raises(BanditError, match="is not JSON"):
        BanditPolicy.load(tmp_path / "pickle.bin")
    (tmp_path / "other.json").write_text('{"format": "something"}')
    with pytest.raises(BanditError, match="is not a relaydiff.bandit version 1 state file"):
        BanditPolicy.load(tmp_path / "other.json")
    good = BanditPolicy().to_json()
    good["observations"] = [{"context": {**GOOD, "rtt_s": -5}, "fraction": 0.5, "variant": "device", "reward": 0.5}]
    (tmp_path / "neg.json").write_text(__import__("json").dumps(good))
    with pytest.raises(BanditError, match="context rtt_s is -5"):
        BanditPolicy.load(tmp_path / "neg.json")


def test_an_arm_with_an_unconfigured_budget_is_refused() -> None:
    policy = BanditPolicy(BanditConfig(budgets=(1.0, 0.5)))
    with pytest.raises(BanditError, match=r"device budget is 0.25; expected one of \[1.0, 0.5\]"):
        policy.record(BanditContext(**GOOD), Arm(0.5, "device", 0.25), 0.5)  # type: ignore[arg-type]
