"""Cached device halves and schedules: exact budgets, the uncached case equals the relay's device half."""

from __future__ import annotations

import pytest
import torch

from relaydiff.cache.schedules import budget_for, check_budget, fixed_half, heuristic_half, uniform_mask
from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest, resume, snapshots

N, K = 8, 3


@pytest.fixture(scope="module")
def state(tiny_pair):  # type: ignore[no-untyped-def]
    host, _ = tiny_pair
    return snapshots(host, RelayRequest("a red circle", relay_step=0, steps=N, seed=3), [K])[K][0]


@pytest.mark.parametrize("mechanism", ["reuse", "forecast"])
def test_all_full_schedule_equals_the_relay_device_half(tiny_pair, state, mechanism: str) -> None:
    _, device = tiny_pair
    want = resume(device, state).latents
    got = fixed_half(device, state, torch.ones(1, N - K, dtype=torch.bool), mechanism=mechanism)
    assert (got.latents - want).abs().max() <= 1e-6
    assert bool(got.recomputed.all())


@pytest.mark.parametrize("m", [1, 2, 5, 17, 22])
def test_uniform_mask_spends_exactly_the_budget(m: int) -> None:
    for b in range(1, m + 1):
        mask = uniform_mask(m, b)
        assert int(mask.sum()) == b and bool(mask[0])


def test_fewer_full_steps_move_the_result_away_from_uncached(tiny_pair, state) -> None:
    _, device = tiny_pair
    m = N - K
    masks = torch.stack([uniform_mask(m, b) for b in (m, 2, 1)])
    out = fixed_half(device, state, masks)
    err = [(out.latents[i] - out.latents[0]).norm().item() for i in range(3)]
    assert err[0] == 0.0 and 0 < err[1] and 0 < err[2]


@pytest.mark.parametrize("mechanism", ["reuse", "forecast"])
def test_heuristic_spends_exactly_each_budget(tiny_pair, state, mechanism: str) -> None:
    _, device = tiny_pair
    m = N - K
    budgets = list(range(1, m + 1))
    half, deltas = heuristic_half(device, state, budgets, mechanism=mechanism, iterations=6)
    assert half.recomputed.sum(dim=1).tolist() == budgets
    assert bool(half.recomputed[:, 0].all())
    assert deltas.shape == (m,) and bool((deltas > 0).all())
    assert bool((half.probe_change[:, 1:] >= 0).all())


def test_fixed_schedule_must_start_full(tiny_pair, state) -> None:
    _, device = tiny_pair
    mask = torch.ones(1, N - K, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(RelaydiffError, match="first device step"):
        fixed_half(device, state, mask)
    with pytest.raises(RelaydiffError, match=r"\(E, 5\) masks"):
        fixed_half(device, state, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("budget", [0, -1, 18, True, 2.5])
def test_budget_outside_range_is_refused(budget: object) -> None:
    with pytest.raises(RelaydiffError, match=rf"cache budget {budget!r} is outside \[1, 17\]"):
        check_budget(budget, 17)  # type: ignore[arg-type]


def test_budget_for_fraction() -> None:
    assert budget_for(1.0, 17) == 17
    assert budget_for(0.5, 17) == 8
    assert budget_for(0.01, 17) == 1
    with pytest.raises(RelaydiffError, match="fraction 0.0 must lie in"):
        budget_for(0.0, 17)
