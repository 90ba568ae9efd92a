"""Mechanisms of the cached denoiser: reuse, first-order forecast, per-row caches."""

from __future__ import annotations

import pytest
import torch

from relaydiff.core.caching.denoiser import CachedDenoiser
from relaydiff.core.caching.split import SplitUNet
from relaydiff.core.errors import RelaydiffError


def _x(unet, seed: int, rows: int = 2) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    s = int(unet.config.sample_size)
    return torch.randn(rows, int(unet.config.in_channels), s, s, generator=g)


def _e(unet, rows: int = 2) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.randn(rows, 16, int(unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(99))


def test_forecast_extrapolates_linearly_from_the_last_two_full_steps(tiny_pair) -> None:
    unet = tiny_pair[1].unet
    e = _e(unet)
    split = SplitUNet(unet, 0)
    den = CachedDenoiser(unet, "forecast", 0)
    xs = {i: _x(unet, i) for i in (0, 2, 5)}
    ts = {0: torch.tensor(900), 2: torch.tensor(700), 5: torch.tensor(400)}
    with torch.no_grad():
        den(xs[0], ts[0], e, step=0, recompute=True)
        den(xs[2], ts[2], e, step=2, recompute=True)
        got = den(xs[5], ts[5], e, step=5, recompute=False)
        d0 = split.full(xs[0], ts[0], e)[1]
        d2 = split.full(xs[2], ts[2], e)[1]
        want = split.cached(split.shallow_down(xs[5], ts[5], e), d2 + (5 - 2) / (2 - 0) * (d2 - d0), e)
        reuse = split.cached(split.shallow_down(xs[5], ts[5], e), d2, e)
    assert (got - want).abs().max() <= 1e-5
    assert not torch.allclose(got, reuse)


def test_forecast_with_one_full_step_is_reuse(tiny_pair) -> None:
    unet = tiny_pair[1].unet
    e = _e(unet)
    a, b = CachedDenoiser(unet, "forecast", 0), CachedDenoiser(unet, "reuse", 0)
    with torch.no_grad():
        for den in (a, b):
            den(_x(unet, 0), torch.tensor(900), e, step=0, recompute=True)
        x = _x(unet, 1)
        assert torch.equal(a(x, torch.tensor(800), e, step=1, recompute=False), b(x, torch.tensor(800), e, step=1, recompute=False))


@pytest.mark.parametrize("mechanism", ["reuse", "forecast"])
def test_rows_keep_their_own_caches(tiny_pair, mechanism: str) -> None:
    """Two trajectories in one batch, with different schedules, equal the two run alone."""
    unet = tiny_pair[1].unet
    e = _e(unet, 1)
    schedules = [[True, False, True, False], [True, True, False, False]]
    xs = [_x(unet, 10 + j, rows=2) for j in range(4)]  # row 0 follows schedule 0, row 1 schedule 1
    ts = [torch.tensor(v) for v in (900, 700, 500, 300)]
    with torch.no_grad():
        batched = CachedDenoiser(unet, mechanism, 0)
        outs = [batched(xs[j], ts[j], e.repeat(2, 1, 1), step=j, recompute=torch.tensor([schedules[0][j], schedules[1][j]]))
                for j in range(4)]
        for r in range(2):
            alone = CachedDenoiser(unet, mechanism, 0)
            for j in range(4):
                single = alone(xs[j][r : r + 1], ts[j], e, step=j, recompute=schedules[r][j])
                assert (single - outs[j][r : r + 1]).abs().max() <= 1e-5


def test_cached_step_before_any_full_step_is_refused(tiny_pair) -> None:
    unet = tiny_pair[1].unet
    den = CachedDenoiser(unet, "reuse", 0)
    with pytest.raises(RelaydiffError, match="needs an earlier full step"):
        den(_x(unet, 0), torch.tensor(900), _e(unet), step=0, recompute=False)


def test_unknown_mechanism_is_refused(tiny_pair) -> None:
    with pytest.raises(RelaydiffError, match="unknown cache mechanism 'magic'; expected one of: reuse, forecast"):
        CachedDenoiser(tiny_pair[1].unet, "magic", 0)
