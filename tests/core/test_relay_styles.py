"""The relay on SDXL- and SD3-style tiny families: the self-relay invariant for every sampler of each style,
parity with diffusers' own pipelines, and what a version-2 relay state carries for them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.relay import RelayRequest, relay, resume, start
from relaydiff.core.schedulers import SAMPLERS
from relaydiff.core.state import RelayState

N = 4
FLOW = sorted(name for name, spec in SAMPLERS.items() if spec.flow)


def _self_relay(model, sampler: str) -> None:  # type: ignore[no-untyped-def]
    base = RelayRequest("a red circle left of a blue square", relay_step=N, steps=N, sampler=sampler, seed=7,
                        guidance_scale=4.0)
    reference = relay(model, model, base)
    for k in (0, 1, 3):
        got = relay(model, model, replace(base, relay_step=k))
        assert torch.allclose(got.latents, reference.latents, atol=1e-5, rtol=0), (sampler, k)


@pytest.mark.parametrize("sampler", FLOW)
def test_sd3_self_relay_equals_no_relay(tiny_sd3_pair, sampler: str) -> None:  # type: ignore[no-untyped-def]
    _self_relay(tiny_sd3_pair[0], sampler)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_self_relay_equals_no_relay(tiny_sdxl_pair, sampler: str) -> None:  # type: ignore[no-untyped-def]
    _self_relay(tiny_sdxl_pair[0], sampler)


def test_sd3_host_only_matches_the_diffusers_pipeline(tiny_sd3_pair) -> None:  # type: ignore[no-untyped-def]
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    host, _ = tiny_sd3_pair
    pipe = StableDiffusion3Pipeline(
        transformer=host.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(host.scheduler_config), vae=host.vae,
        text_encoder=host.text_encoder, tokenizer=host.tokenizer, text_encoder_2=host.text_encoder_2,
        tokenizer_2=host.tokenizer_2, text_encoder_3=host.text_encoder_3, tokenizer_3=host.tokenizer_3)
    want = pipe("a green square", num_inference_steps=N, guidance_scale=4.0, output_type="latent", max_sequence_length=16,
                generator=torch.Generator("cpu").manual_seed(5)).images
    got = relay(host, host, RelayRequest("a green square", relay_step=2, steps=N, sampler="flow_euler", seed=5,
                                         guidance_scale=4.0))
    assert got.latents.shape == want.shape == (1, 16, 8, 8)
    assert torch.allclose(got.latents, want, atol=1e-5, rtol=0)


def test_sdxl_host_only_matches_the_diffusers_pipeline(tiny_sdxl_pair) -> None:  # type: ignore[no-untyped-def]
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    host, _ = tiny_sdxl_pair
    pipe = StableDiffusionXLPipeline(
        unet=host.unet, scheduler=EulerDiscreteScheduler.from_config(host.scheduler_config), vae=host.vae,
        text_encoder=host.text_encoder, tokenizer=host.tokenizer, text_encoder_2=host.text_encoder_2,
        tokenizer_2=host.tokenizer_2)
    want = pipe("a green square", num_inference_steps=N, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(5)).images
    got = relay(host, host, RelayRequest("a green square", relay_step=2, steps=N, sampler="euler", seed=5, guidance_scale=4.0))
    assert torch.allclose(got.latents, want, atol=1e-5, rtol=0)


def test_states_carry_the_added_conditioning_and_schedule(tiny_sd3_pair, tiny_sdxl_pair) -> None:  # type: ignore[no-untyped-def]
    sd3 = start(tiny_sd3_pair[0], RelayRequest("a cat", relay_step=2, steps=N, sampler="flow_euler", guidance_scale=4.0))
    assert sd3.pooled_projections is not None and sd3.pooled_projections.shape == (1, 32)
    assert sd3.negative_pooled_projections is not None and sd3.time_ids is None
    assert sd3.noise_schedule["kind"] == "flow" and sd3.noise_schedule["shift"] == 3.0 and sd3.mu is None
    assert sd3.sigmas is not None and sd3.sigmas.shape == (N + 1,)
    xl = start(tiny_sdxl_pair[0], RelayRequest("a cat", relay_step=2, steps=N, sampler="euler", guidance_scale=4.0))
    assert xl.time_ids is not None and xl.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    assert xl.pooled_text_embeds is not None and xl.pooled_text_embeds.shape == (1, 16)
    assert xl.noise_schedule["kind"] == "diffusion"
    for state in (sd3, xl):
        data = state.to_bytes()
        again = RelayState.from_bytes(data)
        assert again.to_bytes() == data and again.noise_schedule == state.noise_schedule


def test_flow_samplers_really_use_what_travels(tiny_sd3_pair) -> None:  # type: ignore[no-untyped-def]
    host, _ = tiny_sd3_pair
    dpm = start(host, RelayRequest("a dog", relay_step=2, steps=N, sampler="flow_dpmpp_2m"))
    assert set(dpm.history) == {"model_outputs.0", "model_outputs.1"}
    stripped = replace(dpm, history={}, history_ints={"solver_order": 2, "lower_order_nums": 0})
    assert not torch.allclose(resume(host, dpm).latents, resume(host, stripped).latents, atol=1e-4)
    sde = start(host, RelayRequest("a dog", relay_step=2, steps=N, sampler="flow_euler_sde"))
    assert sde.generator_state is not None
    other = replace(sde, generator_state=torch.Generator().manual_seed(9).get_state())
    assert not torch.allclose(resume(host, sde).latents, resume(host, other).latents, atol=1e-4)


def test_a_style_refuses_the_other_styles_samplers_and_states(tiny_sd3_pair, tiny_sdxl_pair) -> None:  # type: ignore[no-untyped-def]
    sd3, xl = tiny_sd3_pair[0], tiny_sdxl_pair[0]
    with pytest.raises(RelaydiffError, match="sampler 'ddim' cannot sample a rectified-flow family"):
        start(sd3, RelayRequest("x", relay_step=1, steps=N, sampler="ddim"))
    with pytest.raises(RelaydiffError, match="sampler 'flow_euler' cannot sample a diffusion family"):
        start(xl, RelayRequest("x", relay_step=1, steps=N, sampler="flow_euler"))
    state = start(sd3, RelayRequest("x", relay_step=1, steps=N, sampler="flow_euler", guidance_scale=4.0))
    with pytest.raises(RelaydiffError) as info:
        resume(xl, state)
    assert "scheduler.kind" in str(info.value) and "scheduler.shift" in str(info.value)
    no_pooled = replace(state, pooled_projections=None, negative_pooled_projections=None)
    with pytest.raises(RelayStateError, match="lacks pooled_projections"):
        resume(sd3, no_pooled)
