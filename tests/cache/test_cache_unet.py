"""The split UNet: a full step is the UNet's own forward; a cached step given this step's deep features is too."""

from __future__ import annotations

import pytest
import torch

from relaydiff.core.caching.denoiser import CachedDenoiser
from relaydiff.cache.evaluate import step_flops
from relaydiff.core.caching.split import SplitUNet
from relaydiff.core.errors import RelaydiffError


def _inputs(unet, rows: int = 2, size: int | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    s = size or int(unet.config.sample_size)
    x = torch.randn(rows, int(unet.config.in_channels), s, s, generator=g)
    e = torch.randn(rows, 16, int(unet.config.cross_attention_dim), generator=g)
    return x, e


@pytest.mark.parametrize("role", ["host", "device"])
@pytest.mark.parametrize("size", [None, 7])
def test_full_step_equals_unet_forward(tiny_pair, role: str, size: int | None) -> None:
    model = tiny_pair[0] if role == "host" else tiny_pair[1]
    unet = model.unet
    x, e = _inputs(unet, size=size)
    t = torch.tensor(637)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e).sample
        for branch in range(len(unet.down_blocks)):
            eps, deep, probe = SplitUNet(unet, branch).full(x, t, e)
            assert torch.equal(eps, ref), (role, branch, (eps - ref).abs().max())
            den = CachedDenoiser(unet, "reuse", branch)
            assert torch.equal(den(x, t, e, step=0, recompute=True), ref)


@pytest.mark.parametrize("role", ["host", "device"])
def test_cached_step_with_its_own_deep_features_is_the_full_step(tiny_pair, role: str) -> None:
    unet = (tiny_pair[0] if role == "host" else tiny_pair[1]).unet
    x, e = _inputs(unet, seed=1)
    t = torch.tensor(201)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e).sample
        for branch in range(len(unet.down_blocks)):
            split = SplitUNet(unet, branch)
            _, deep, _ = split.full(x, t, e)
            out = split.cached(split.shallow_down(x, t, e), deep, e)
            assert (out - ref).abs().max() <= 1e-6


def test_cached_step_reuses_deep_features_of_an_earlier_step(tiny_pair) -> None:
    unet = tiny_pair[1].unet
    x0, e = _inputs(unet, seed=2)
    x1, _ = _inputs(unet, seed=3)
    den = CachedDenoiser(unet, "reuse", 0)
    split = SplitUNet(unet, 0)
    with torch.no_grad():
        den(x0, torch.tensor(900), e, step=0, recompute=True)
        got = den(x1, torch.tensor(800), e, step=1, recompute=False)
        _, deep0, _ = split.full(x0, torch.tensor(900), e)
        want = split.cached(split.shallow_down(x1, torch.tensor(800), e), deep0, e)
        full1 = unet(x1, torch.tensor(800), encoder_hidden_states=e).sample
    assert torch.equal(got, want)
    assert not torch.allclose(got, full1)  # it really skipped the deep part


def test_a_cached_step_costs_fewer_flops(tiny_pair) -> None:
    unet = tiny_pair[1].unet
    x, e = _inputs(unet)
    full, cached = step_flops(unet, 0, x, e)
    assert 0 < cached < full
    full_deep, cached_deep = step_flops(unet, len(unet.down_blocks) - 1, x, e)
    assert full_deep == full and cached <= cached_deep <= full


@pytest.mark.parametrize("branch", [-1, 2, 7, True, "0"])
def test_branch_outside_the_unet_is_refused(tiny_pair, branch: object) -> None:
    unet = tiny_pair[1].unet
    with pytest.raises(RelaydiffError, match=r"cache branch .* does not exist in this UNet: .* \[0, 1\]"):
        SplitUNet(unet, branch)  # type: ignore[arg-type]
