"""The contextual-bandit split policy: learning, persistence, the Policy protocol, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from relaydiff.host.bandit import Arm, BanditConfig, BanditContext, BanditError, BanditPolicy, reward
from relaydiff.host.policy import Conditions, ContextualPolicy, Policy
from relaydiff.link.events import DeviceCapabilities, Feedback, GenerateRequest, Ping

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _ctx(w: float = 0.5, **kw: float) -> BanditContext:
    base = dict(complexity=6.0, quality_weight=w, rtt_s=0.05, bandwidth_mbit_s=20.0, host_queue=0.0,
                host_utilisation=0.0, device_steps_per_second=1.0, device_load=0.0, steps=25)
    base.update(kw)
    return BanditContext(**base)  # type: ignore[arg-type]


def _planted(ctx: BanditContext, arm: Arm) -> float:
    """Best arm 0.1 for speed-minded users (w < 0.5), 0.7 for quality-minded ones; everything else is worse."""
    best = 0.1 if ctx.quality_weight < 0.5 else 0.7
    return 0.9 if arm.fraction == best else 0.3


def _train(policy: BanditPolicy, rounds: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        ctx = _ctx(float(rng.choice([0.1, 0.3, 0.7, 0.9])), host_queue=float(rng.integers(0, 5)),
                   rtt_s=float(rng.uniform(0.01, 0.3)), complexity=float(rng.integers(4, 13)))
        arm = policy.choose_arm(ctx)
        policy.record(ctx, arm, _planted(ctx, arm))


def test_learns_the_planted_best_arm() -> None:
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, seed=0))
    _train(policy, 150)
    assert policy.choose_arm(_ctx(0.1, host_queue=2.0)) == Arm(0.1, "device")
    assert policy.choose_arm(_ctx(0.9, rtt_s=0.2)) == Arm(0.7, "device")
    assert policy.choose_arm(_ctx(0.3, complexity=11.0)) == Arm(0.1, "device")


def test_cold_start_prior_follows_the_preference() -> None:
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS))
    assert [policy.choose_arm(_ctx(w)).fraction for w in (0.0, 0.5, 1.0)] == [0.2, 0.5, 0.7]


def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "bandit.json"
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, variants=("fp32", "int8"), seed=3), state_path=path)
    _train(policy, 60)
    assert path.read_text().startswith('{"format": "relaydiff.bandit"')
    restarted = BanditPolicy.load(path)
    assert restarted.config == policy.config and len(restarted.history) == 60
    rng = np.random.default_rng(1)
    for _ in range(20):
        ctx = _ctx(float(rng.uniform()), host_queue=float(rng.integers(0, 9)), device_load=float(rng.uniform()))
        assert restarted.choose_arm(ctx) == policy.choose_arm(ctx)
        assert restarted.expectations(ctx) == policy.expectations(ctx)  # bit-identical refit


def test_history_is_bounded_and_reload_matches(tmp_path: Path) -> None:
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, max_history=25))
    _train(policy, 40)
    # the window moved once at observation 26 (kept 13) and again at 39 (kept 13): 14 now, never above 25
    assert len(policy.history) == 14
    policy.save(tmp_path / "b.json")
    assert BanditPolicy.load(tmp_path / "b.json").expectations(_ctx(0.4)) == policy.expectations(_ctx(0.4))
    fresh = BanditPolicy(BanditConfig(fractions=FRACTIONS, max_history=25))  # the forgotten half really is gone
    for obs in policy.history:
        fresh.record(obs.context, obs.arm, obs.reward)
    assert fresh.expectations(_ctx(0.4)) == policy.expectations(_ctx(0.4))


def test_recording_past_max_history_never_refits(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, max_history=10))

    def refit() -> None:
        raise AssertionError("record() refitted the whole history")

    monkeypatch.setattr(policy, "_refit", refit)
    _train(policy, 45)
    assert 5 <= len(policy.history) <= 10


def test_state_file_appends_one_line_per_observation(tmp_path: Path) -> None:
    path = tmp_path / "bandit.jsonl"
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, max_history=8), state_path=path, autosave=False)
    _train(policy, 1)
    assert policy.dirty and policy.flush() and not policy.dirty and not policy.flush()
    first = path.read_text().splitlines()[0]
    for n in range(2, 5):  # each flush appends the new observation; the first line stays as it was
        _train(policy, 1, seed=n)
        policy.flush()
        lines = path.read_text().splitlines()
        assert len(lines) == n and lines[0] == first
    assert BanditPolicy.load(path).expectations(_ctx(0.3)) == policy.expectations(_ctx(0.3))
    _train(policy, 5, seed=9)  # 9 observations > max_history 8: the window moves, the next flush compacts
    policy.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and len(policy.history) == 5
    restarted = BanditPolicy.load(path, state_path=path, autosave=False)
    assert restarted.expectations(_ctx(0.8)) == policy.expectations(_ctx(0.8))
    _train(restarted, 1, seed=11)  # the reloaded bandit keeps appending to the same file
    restarted.flush()
    assert len(path.read_text().splitlines()) == 2 and len(BanditPolicy.load(path).history) == 6


def test_flush_in_a_thread_while_recording(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "bandit.jsonl"
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, max_history=30), state_path=path, autosave=False)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            policy.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        _train(policy, 100)
    finally:
        stop.set()
        thread.join()
    policy.flush()
    loaded = BanditPolicy.load(path)
    assert [o.to_json() for o in loaded.history] == [o.to_json() for o in policy.history]
    assert loaded.expectations(_ctx(0.2)) == policy.expectations(_ctx(0.2))


def test_policy_protocol_choose_and_observe() -> None:
    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS, latency_scale_s=10.0))
    assert isinstance(policy, Policy) and isinstance(policy, ContextualPolicy)
    request = GenerateRequest("r1", "a large cyan triangle below a large orange circle", 0.5, 30.0)
    caps = DeviceCapabilities(("torch",), "b", "0" * 64, 2.0)
    k = policy.choose_in(request, caps, 20, Conditions(host_queue=3, host_utilisation=0.5, rtt_s=0.1))
    assert k == 14  # fraction 0.7 of N = 20 (deterministic: LinUCB draws nothing)
    policy.observe(request, k, Feedback("r1", latency_s=4.0, quality=1.0))
    (obs,) = policy.history
    assert obs.arm == Arm(0.7, "device") and obs.context.complexity == 7 and obs.context.rtt_s == 0.1
    assert obs.context.device_steps_per_second == 2.0 and obs.context.host_queue == 3
    assert obs.reward == pytest.approx(reward(1.0, 4.0, 0.5, 10.0)) == pytest.approx(0.8)
    policy.observe(request, k, Feedback("r1", latency_s=4.0, quality=1.0))  # no pending choice: ignored
    assert len(policy.history) == 1


def test_prompt_outside_the_grammar_uses_word_count() -> None:
    policy = BanditPolicy()
    ctx = policy.context(GenerateRequest("r", "an astronaut riding a horse on mars", 0.2, 10.0), None, 25)
    assert ctx.complexity == 3.5  # 7 words / 2


def test_host_server_serves_with_the_bandit(tiny_pair, link_config, token, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import io

    from PIL import Image

    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.link.events import Progress, RelayHandoff, Result, ResultKind
    from relaydiff.link.transport import connect
    from relaydiff.runtime.settings import GenerationSettings

    import threading

    bandit = BanditPolicy(BanditConfig(fractions=FRACTIONS), state_path=tmp_path / "bandit.json")
    flushed_on: list[str] = []
    flush = bandit.flush

    def spy_flush() -> bool:
        flushed_on.append(threading.current_thread().name)
        return flush()

    bandit.flush = spy_flush  # type: ignore[method-assign]
    host = HostServer(tiny_pair[0], tiny_pair[1], auth_token=token, policy=bandit,
                      config=HostConfig(settings=GenerationSettings(steps=4), link=link_config))
    caps = DeviceCapabilities(("torch",), "bandit-test-device", "ab" * 32, 100.0)

    async def main() -> None:
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=caps, config=link_config)
            await link.send(GenerateRequest("r1", "a large cyan triangle below a large orange circle", 0.5, 30.0))
            pings = 0
            while isinstance(progress := await link.recv(), Ping):  # the host's link probe (docs/protocol.md)
                await link.send(progress.pong())
                pings += 1
            assert pings == 2
            assert isinstance(progress, Progress) and progress.step == 3  # fraction 0.7 of N = 4 (deterministic prior choice)
            assert isinstance(await link.recv(), RelayHandoff)
            png = io.BytesIO()
            Image.new("RGB", (4, 4)).save(png, format="PNG")
            await link.send(Result("r1", ResultKind.PNG, png.getvalue()))
            await link.send(Feedback("r1", latency_s=3.0, quality=0.5))
            await asyncio.sleep(0.2)
            await link.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert flushed_on and threading.main_thread().name not in flushed_on  # saved in a worker, never on the loop
    (obs,) = BanditPolicy.load(tmp_path / "bandit.json").history
    assert obs.arm == Arm(0.7, "device") and obs.context.device_steps_per_second == 100.0 and obs.context.steps == 4


def test_arms_include_the_device_budget() -> None:
    cfg = BanditConfig(fractions=(0.0, 0.5, 1.0), variants=("device",), budgets=(1.0, 0.5, 0.25))
    arms = cfg.arms
    assert len(arms) == 3 * 1 * 3 and {a.budget for a in arms} == {1.0, 0.5, 0.25}
    assert Arm(0.5, "device").name == "0.5@device" and Arm(0.5, "device", 0.25).name == "0.5@device/b0.25"
    assert Arm(0.5, "device", 0.25).device_budget(20) == 2  # k = 10: B = round(0.25 x 10)
    assert Arm(0.0, "device", 0.5).device_budget(25) == 12 and Arm(0.0, "device", 0.01).device_budget(25) == 1
    assert Arm(1.0, "device", 0.5).device_budget(20) is None and Arm(0.5, "device").device_budget(20) is None


def test_bandit_learns_a_cached_arm_and_hands_its_budget_to_the_controller(tmp_path: Path) -> None:
    from relaydiff.host.policy import BudgetPolicy

    cfg = BanditConfig(fractions=(0.2, 0.5), budgets=(1.0, 0.5), seed=0)
    policy = BanditPolicy(cfg, state_path=tmp_path / "b.jsonl")
    assert isinstance(policy, BudgetPolicy)
    rng = np.random.default_rng(0)
    for _ in range(80):  # planted: the cached arm at fraction 0.2 is best for everyone
        ctx = _ctx(float(rng.choice([0.2, 0.8])))
        arm = policy.choose_arm(ctx)
        policy.record(ctx, arm, 0.9 if arm == Arm(0.2, "device", 0.5) else 0.3)
    request = GenerateRequest("r9", "a red circle", 0.8, 30.0)
    k = policy.choose_in(request, None, 20, Conditions())
    assert k == 4 and policy.device_budget(request, k, 20) == 8  # B = round(0.5 x 16)
    assert policy.device_budget(request, 10, 20) is None  # k was overridden: no budget for another hand-off
    policy.observe(request, k, Feedback("r9", latency_s=2.0, quality=1.0))
    assert policy.history[-1].arm == Arm(0.2, "device", 0.5)
    restarted = BanditPolicy.load(tmp_path / "b.jsonl")
    assert restarted.history[-1].arm == Arm(0.2, "device", 0.5) and restarted.config.budgets == (1.0, 0.5)


def test_state_files_from_before_budgets_still_load(tmp_path: Path) -> None:
    import json

    policy = BanditPolicy(BanditConfig(fractions=FRACTIONS))
    policy.record(_ctx(), Arm(0.5, "device"), 0.5)
    state = policy.to_json()
    del state["config"]["budgets"]
    for o in state["observations"]:
        del o["budget"]
    (tmp_path / "old.json").write_text(json.dumps(state) + "\n")
    old = BanditPolicy.load(tmp_path / "old.json")
    assert old.config.budgets == (1.0,) and old.history[0].arm == Arm(0.5, "device")


@pytest.mark.parametrize("budgets, message", [((0.0,), r"budgets item is 0.0; expected a finite number in \(0, 1\]"),
                                              ((1.5,), r"budgets item is 1.5"), ((), "budgets is"), ((0.5, 0.5), "duplicates")])
def test_bad_budgets_are_refused(budgets: tuple[float, ...], message: str) -> None:
    with pytest.raises(BanditError, match=message):
        BanditConfig(budgets=budgets)
