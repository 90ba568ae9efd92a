"""The Denoiser interface: conditioning records, the UNet adapter, and the relay loop running any implementation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from relaydiff.core.denoiser import Conditioning, Denoiser, GuidedDenoiser, LatentSpec, UNetDenoiser, latent_spec_of
from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest, relay_side, resume, start


def test_conditioning_batches_and_checks_its_fields() -> None:
    cond = Conditioning(torch.ones(1, 3, 8), pooled_text_embeds=torch.ones(1, 5), time_ids=torch.ones(1, 6))
    both = Conditioning.cat([replace(cond, text_embeds=torch.zeros(1, 3, 8)), cond])
    assert both.batch == 2 and both.time_ids is not None and both.time_ids.shape == (2, 6)
    assert torch.equal(both.text_embeds[0], torch.zeros(3, 8))
    assert cond.float().pooled_text_embeds is not None and cond.float().pooled_text_embeds.dtype == torch.float32
    with pytest.raises(RelaydiffError, match="time_ids has batch 2; the text embeddings have 1"):
        Conditioning(torch.ones(1, 3, 8), time_ids=torch.ones(2, 6))
    with pytest.raises(RelaydiffError, match="different fields"):
        Conditioning.cat([Conditioning(torch.ones(1, 3, 8)), cond])
    with pytest.raises(RelaydiffError, match=r"must be \(B, L, D\)"):
        Conditioning(torch.ones(3, 8))


def test_latent_spec_of_a_family_model(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, device = tiny_pair
    spec = latent_spec_of(device)
    assert spec.channels == device.unet.config.in_channels
    assert spec.sample_size == (device.unet.config.sample_size,) * 2
    assert spec.scaling_factor == pytest.approx(device.vae.config.scaling_factor)
    assert spec.prediction_type == device.scheduler_config.get("prediction_type", "epsilon")
    assert spec.schedule["beta_schedule"] == device.scheduler_config["beta_schedule"]
    assert isinstance(UNetDenoiser(device.unet, spec), Denoiser)
    assert not isinstance(UNetDenoiser(device.unet, spec), GuidedDenoiser)


def test_sdxl_added_conditioning_reaches_the_unet() -> None:
    """A UNet with SDXL's text_time embedding: pooled embeddings and time ids go in, and they change the output."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=5 + 6 * 4,
    ).eval()
    spec = LatentSpec.from_configs(dict(unet.config), {"scaling_factor": 0.13}, {"prediction_type": "epsilon"})
    den = UNetDenoiser(unet, spec)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    cond = Conditioning(torch.randn(1, 3, 8), pooled_text_embeds=torch.randn(1, 5), time_ids=torch.tensor([[8.0, 8, 0, 0, 8, 8]]))
    with torch.no_grad():
        a = den(x, t, cond)
        b = den(x, t, replace(cond, time_ids=torch.tensor([[16.0, 16, 0, 0, 8, 8]])))
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(RelaydiffError, match="no pooled projections"):
        den(x, t, replace(cond, pooled_projections=torch.ones(1, 5)))


class _SelfGuided:
    """A GuidedDenoiser over a UNetDenoiser that does CFG in two separate calls (not one batch)."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner, self.calls = inner, 0

    @property
    def latent_spec(self) -> LatentSpec:
        return self.inner.latent_spec

    @property
    def text_embed_dim(self) -> int:
        return self.inner.text_embed_dim

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.inner(latent, timestep, conditioning)

    def guided(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning,
               guidance_scale: float) -> torch.Tensor:
        self.calls += 1
        e_u, e_c = self.inner(latent, timestep, uncond), self.inner(latent, timestep, cond)
        return e_u + guidance_scale * (e_c - e_u)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_the_relay_loop_runs_a_guided_denoiser(tiny_pair, guidance: float) -> None:  # type: ignore[no-untyped-def]
    """Resuming with a GuidedDenoiser gives the batched-CFG result; with CFG off it is not asked to guide."""
    host, device = tiny_pair
    state = start(host, RelayRequest("a red circle", relay_step=2, steps=5, guidance_scale=guidance, seed=3))
    side = relay_side(device)
    guided = _SelfGuided(side.denoiser)
    assert isinstance(guided, GuidedDenoiser)
    got = resume(replace(side, denoiser=guided), state).latents
    assert torch.allclose(got, resume(device, state).latents, atol=1e-5, rtol=0)
    assert guided.calls == (3 if guidance > 1 else 0)
