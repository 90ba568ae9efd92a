"""Img2img refinement: strength 1 is generation from the same noise; lower strengths run the schedule's tail."""

from __future__ import annotations

import pytest
import torch

from relaydiff.core.refine import plan, refine
from relaydiff.core.relay import RelayRequest, encode_prompt, relay_side, start
from relaydiff.core.schedulers import SAMPLERS, build_scheduler, sampler_spec, set_steps

N = 6
DIFFUSION_SAMPLERS = sorted(s for s in SAMPLERS if not sampler_spec(s).flow)  # the tiny family is a diffusion family
PROMPT = "a red circle left of a blue square"


@pytest.mark.parametrize("sampler", DIFFUSION_SAMPLERS)
def test_strength_one_equals_generation_from_the_same_noise(tiny_pair, sampler: str) -> None:
    host, _ = tiny_pair
    req = RelayRequest(PROMPT, relay_step=N, steps=N, sampler=sampler, seed=11)
    reference = start(host, req).latents
    embeds = encode_prompt(host, PROMPT)
    some_latent = torch.randn_like(reference)  # discarded at strength 1
    got = refine(relay_side(host), some_latent, embeds, strength=1.0, steps=N, sampler=sampler, seed=11)
    assert torch.equal(got.latents, reference), sampler
    assert got.plan.calls == N


@pytest.mark.parametrize("sampler", DIFFUSION_SAMPLERS)
def test_lower_strength_runs_the_tail_and_keeps_the_latent(tiny_pair, sampler: str) -> None:
    host, _ = tiny_pair
    side = relay_side(host)
    embeds = encode_prompt(host, PROMPT)
    x0 = start(host, RelayRequest(PROMPT, relay_step=N, steps=N, sampler=sampler, seed=3)).latents
    other = torch.randn_like(x0) * 3
    low = refine(side, x0, embeds, strength=0.34, steps=N, sampler=sampler, seed=5)
    low_other = refine(side, other, embeds, strength=0.34, steps=N, sampler=sampler, seed=5)
    assert torch.isfinite(low.latents).all()
    assert 1 <= low.plan.calls < N
    # the start latent matters at low strength: different x_0, different result
    assert not torch.allclose(low.latents, low_other.latents, atol=1e-3)
    # and a low-strength refinement of x_0 stays closer to x_0 than one from another latent
    assert (low.latents - x0).norm() < (low_other.latents - x0).norm()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "pndm"])
def test_plan_counts_calls_by_strength(tiny_pair, sampler: str) -> None:
    host, _ = tiny_pair
    sch = build_scheduler(sampler, host.scheduler_config)
    set_steps(sch, 10)
    calls = [plan(sch, 10, s).calls for s in (0.01, 0.3, 0.5, 0.7, 1.0)]
    assert calls == sorted(calls) and calls[-1] == 10 and calls[0] >= 1
    if sampler == "pndm":  # 9 distinct timesteps; a tail of m > 1 of them repeats its second for the warm-up
        tail = plan(sch, 10, 0.5)
        distinct = torch.cat([sch.timesteps[:1], sch.timesteps[2:]])
        m = round(0.5 * 9)
        assert tail.timesteps.tolist() == [*distinct[-m:][:2].tolist(), *distinct[-m:][1:].tolist()]
    else:
        assert plan(sch, 10, 0.3).timesteps.tolist() == sch.timesteps[7:].tolist()
