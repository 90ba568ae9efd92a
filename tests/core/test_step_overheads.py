"""The per-device-half costs that are not UNet passes, memoised: a sampler's prototype, a policy's schedule.

Each memo must return what a fresh computation gives, hand out copies (a caller's mutation or a sampler's steps
never reach the next caller) and stay bounded (configs and grids come from the wire).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from relaydiff.core import schedulers
from relaydiff.core.caching import device as cache_device
from relaydiff.core.caching.device import device_schedule, torch_cache
from relaydiff.core.caching.policy import learned_mask
from relaydiff.core.family import EMBEDDED_FAMILY


def _run(scheduler, x: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    for t, e in zip(scheduler.timesteps[: len(eps)], eps, strict=False):
        x = schedulers.step(scheduler, e, t, x, None)
    return x


def test_restored_schedulers_are_fresh_copies(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    """A restored sampler steps exactly as one built from scratch, even after an earlier copy has stepped."""
    import diffusers

    _, device = tiny_pair
    cfg = dict(device.scheduler_config)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]
    for name in ("ddim", "dpmpp_2m", "unipc"):  # the multistep ones keep a history
        used = schedulers.restore_scheduler(name, cfg, 8)
        _run(used, x, eps)  # moves its step counter and multistep history
        again = schedulers.restore_scheduler(name, cfg, 8)
        scratch = getattr(diffusers, schedulers.sampler_spec(name).class_name).from_config(cfg)
        schedulers.set_steps(scratch, 8)
        assert again is not used
        assert torch.equal(_run(again, x, eps), _run(scratch, x, eps)), name


def test_restore_keeps_a_bounded_number_of_prototypes(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, device = tiny_pair
    cfg = dict(device.scheduler_config)
    for steps in range(2, 2 + schedulers._PROTOTYPES_MAX + 5):
        assert len(schedulers.restore_scheduler("ddim", cfg, steps).timesteps) == steps
    assert len(schedulers._PROTOTYPES) == schedulers._PROTOTYPES_MAX


def test_device_schedule_is_computed_once_per_handoff_and_budget(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.core import family

    model = family.load(family.resolve(EMBEDDED_FAMILY, role="device"))
    cache = replace(torch_cache(model))  # a fresh memo
    assert cache.policy is not None
    cfg = dict(model.scheduler_config)
    ts = schedulers.restore_scheduler("ddim", cfg, 25).timesteps
    calls = []
    real = learned_mask

    def counted(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(a[2:4])
        return real(*a, **kw)

    import relaydiff.core.caching.policy as policy_mod

    monkeypatch.setattr(policy_mod, "learned_mask", counted)
    first = device_schedule(cache, ts, 8, 5, cfg)
    assert torch.equal(first, real(cache.policy, ts, 8, 5, cfg)) and int(first.sum()) == 5
    first[:] = False  # the caller's copy: the memo keeps its own
    again = device_schedule(cache, ts, 8, 5, cfg)
    assert int(again.sum()) == 5 and len(calls) == 1
    device_schedule(cache, ts, 8, 6, cfg)
    assert len(calls) == 2  # another budget is another schedule
    monkeypatch.setattr(cache_device, "_MAX_SCHEDULES", 3)
    for b in range(1, 10):
        device_schedule(cache, ts, 8, b, cfg)
    assert len(cache._schedules) <= 3
