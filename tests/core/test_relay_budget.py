"""A device budget B on a request and its relay state: exactly B full UNet passes on the device, bad budgets refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from relaydiff.cache.run import cached_half, fixed
from relaydiff.core import family
from relaydiff.core.caching.budget import uniform_mask
from relaydiff.core.caching.device import device_schedule, family_policy_path, torch_cache
from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.family import EMBEDDED_FAMILY
from relaydiff.core.relay import RelayRequest, relay, resume, start
from relaydiff.core.state import RelayState, validate
from relay_state_crafting import join, split


def _count_deep_passes(unet) -> list[int]:  # type: ignore[no-untyped-def]
    """Count full passes: up_blocks[0] runs only in the deep part (cache branch 0), once per full step (CFG is one batch)."""
    calls = [0]
    unet.up_blocks[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def counted_pair(tiny_family: Path):  # type: ignore[no-untyped-def]
    host = family.load(family.resolve(tiny_family, role="host"))
    device = family.load(family.resolve(tiny_family, role="device"))  # its own UNet: the hook counts device passes only
    return host, device, _count_deep_passes(device.unet)


def test_relay_with_budget_runs_exactly_b_full_passes(counted_pair) -> None:  # type: ignore[no-untyped-def]
    host, device, calls = counted_pair
    req = RelayRequest("a red circle", relay_step=2, steps=8, cache_budget=3)
    before = calls[0]
    res = relay(host, device, req)
    assert calls[0] - before == 3
    state = RelayState.from_bytes(res.handoff)
    assert state.cache_budget == 3  # the budget crossed the link in the state
    plain = resume(device, replace(state, cache_budget=None))
    assert calls[0] - before == 3 + 6  # without a budget every device step is full
    assert not torch.equal(res.latents, plain.latents)
    whole = resume(device, replace(state, cache_budget=6))  # B = N - k: nothing cached
    torch.testing.assert_close(whole.latents, plain.latents, rtol=1e-4, atol=1e-5)


def test_budgeted_resume_matches_the_batched_cached_half(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    """resume's single-trajectory cache loop gives the same latents as relaydiff.cache.run on the same schedule."""
    host, device = tiny_pair
    state = start(host, RelayRequest("a blue square", relay_step=2, steps=8, cache_budget=3))
    for mechanism in ("reuse", "forecast"):
        cache = replace(torch_cache(device), mechanism=mechanism)
        mask = device_schedule(cache, state.timesteps, 2, 3, state.scheduler_config)
        assert int(mask.sum()) == 3 and bool(mask[0])
        from relaydiff.core.relay import RelaySide, relay_side

        side: RelaySide = replace(relay_side(device), cache=cache)
        got = resume(side, state).latents
        want = cached_half(device, state, fixed(mask[None]), 1, mechanism=mechanism).latents
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_family_without_a_policy_spends_the_budget_uniformly(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, device = tiny_pair
    assert not family_policy_path(device.ref.root).is_file()
    cache = torch_cache(device)
    assert cache.policy is None and cache.source == "uniform"
    assert torch.equal(device_schedule(cache, torch.arange(8), 2, 3, device.scheduler_config), uniform_mask(6, 3))


def test_the_embedded_family_uses_its_committed_policy() -> None:
    ref = family.resolve(EMBEDDED_FAMILY, role="device")
    model = family.load(ref)
    cache = torch_cache(model)
    assert cache.policy is not None and cache.source == str(family_policy_path(EMBEDDED_FAMILY))
    assert cache.policy_config is not None and cache.policy_config.family_id == model.family_id


def test_a_policy_of_another_family_is_refused_naming_both(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, device = tiny_pair
    with pytest.raises(RelaydiffError, match=r"trained for family 'fam-[0-9a-f]+'; the device model is family 'fam-"):
        torch_cache(device, policy_path=family_policy_path(EMBEDDED_FAMILY))


def test_student_honours_the_budget() -> None:
    """A student caches across its own jumps: min(B, jumps) full passes (the embedded family has a student)."""
    from relaydiff.core.student import coarse_indices

    student = family.load(family.resolve(EMBEDDED_FAMILY, "student", role="device"))
    assert student.student is not None
    calls = _count_deep_passes(student.unet)
    spec = student.student
    state = start(student, RelayRequest("a red circle", relay_step=spec.relay_step, steps=spec.steps, cache_budget=2))
    calls[0] = 0  # the host steps above ran on this UNet too
    resume(student, state)
    jumps = len(coarse_indices(spec.steps, spec.relay_step, spec.student_steps))
    assert jumps > 2 and calls[0] == 2


@pytest.mark.parametrize("budget", [0, -1, 7, True, 2.0])
def test_bad_budget_on_a_request_is_refused_with_the_range(budget: object) -> None:
    with pytest.raises(RelaydiffError, match=rf"cache budget {budget!r} is outside \[1, 6\]"):
        RelayRequest("x", relay_step=2, steps=8, cache_budget=budget)  # type: ignore[arg-type]


def test_host_only_request_takes_no_budget() -> None:
    with pytest.raises(RelaydiffError, match=r"outside \[1, 0\]"):
        RelayRequest("x", relay_step=8, steps=8, cache_budget=1)


def test_bad_budget_in_a_relay_state_is_refused(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    host, _ = tiny_pair
    state = start(host, RelayRequest("x", relay_step=2, steps=8))
    assert "cache_budget" not in state.to_bytes().decode("latin-1")  # no budget: the bytes of a state before the key existed
    with pytest.raises(RelayStateError, match=r"cache budget 7 is outside \[1, 6\]"):
        validate(replace(state, cache_budget=7))  # a state is built unvalidated; its consumer validates it once
    good = replace(state, cache_budget=6).to_bytes()
    assert RelayState.from_bytes(good).cache_budget == 6
    tensors, meta = split(good)
    for bad, message in ((9, r"cache budget 9 is outside \[1, 6\]"), ("6", r"'cache_budget' has value '6'"),
                         (0, r"cache budget 0 is outside \[1, 6\]")):
        with pytest.raises(RelayStateError, match=message):
            RelayState.from_bytes(join(tensors, {**meta, "cache_budget": bad}))


def test_a_side_without_a_cached_step_refuses_a_budget(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.core.relay import relay_side

    host, device = tiny_pair
    state = start(host, RelayRequest("x", relay_step=2, steps=8, cache_budget=2))
    with pytest.raises(RelaydiffError, match="cannot honour cache budget 2"):
        resume(relay_side(device), state)
    with pytest.raises(RelaydiffError, match="finishes the trajectory"):
        resume(device, state, end=5)
