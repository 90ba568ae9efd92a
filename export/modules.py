"""The torch modules that are exported: thin wrappers that bake the device-side math into the graph.

Each wrapper's forward takes exactly the declared inputs, in declared order, and returns the
declared outputs, so every exporter captures the same function the relay loop computes
(``relaydiff.core.relay.denoise`` and ``relaydiff.core.relay.decode``).
"""

from __future__ import annotations

from typing import Any

import torch


class UNetStep(torch.nn.Module):
    """One denoising step's noise prediction with classifier-free guidance inside the graph.

    The latent is duplicated into a batch of two against [uncond, cond] embeddings, then combined as
    eps = eps_uncond + g * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6), as the relay loop does.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, guidance_scale: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([sample, sample])
        eps = self.unet(x, timestep, encoder_hidden_states=text_embeds, return_dict=False)[0]
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class UNetBatch(torch.nn.Module):
    """The plain UNet call (CFG as a batch of two is left to the caller)."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=text_embeds, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """Latent -> image in [0, 1]: undo the VAE scaling/shift, decode, map [-1, 1] to [0, 1]."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = None if shift is None else float(shift)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


class TextEncoder(torch.nn.Module):
    """Token ids -> the text encoder's last hidden state (what the UNet cross-attends to)."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class UNetStepFull(torch.nn.Module):
    """``unet_step`` split for feature caching: the guided noise prediction and the deep features D of the CFG batch.

    The same step as :class:`UNetStep` through :class:`~relaydiff.core.caching.split.SplitUNet` at ``cache_branch``;
    D (the [uncond, cond] rows' deep features) is what a cached step takes back in.
    """

    def __init__(self, unet: Any, cache_branch: int = 0) -> None:
        from relaydiff.core.caching.split import SplitUNet

        super().__init__()
        self.unet = unet
        self.split = SplitUNet(unet, cache_branch)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, guidance_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps, deep, _probe = self.split.full(torch.cat([sample, sample]), timestep, text_embeds)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond), deep


class UNetStepCached(torch.nn.Module):
    """A cached ``unet_step``: the shallow branch on the latent, the deep part replaced by the given features D."""

    def __init__(self, unet: Any, cache_branch: int = 0) -> None:
        from relaydiff.core.caching.split import SplitUNet

        super().__init__()
        self.unet = unet
        self.split = SplitUNet(unet, cache_branch)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, guidance_scale: torch.Tensor,
        deep_features: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat([sample, sample])
        eps = self.split.cached(self.split.shallow_down(x, timestep, text_embeds), deep_features, text_embeds)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class SDXLUNetStep(torch.nn.Module):
    """:class:`UNetStep` for an SDXL-style UNet (``addition_embed_type="text_time"``): the pooled text embeddings and
    the six size/crop time ids of [uncond, cond] go in as the UNet's ``added_cond_kwargs``, CFG inside the graph."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, pooled_text_embeds: torch.Tensor,
        time_ids: torch.Tensor, guidance_scale: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat([sample, sample])
        added = {"text_embeds": pooled_text_embeds, "time_ids": time_ids}
        eps = self.unet(x, timestep, encoder_hidden_states=text_embeds, added_cond_kwargs=added, return_dict=False)[0]
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class SD3TransformerStep(torch.nn.Module):
    """One denoising step of an SD3-style ``SD3Transformer2DModel`` (MMDiT): the joint text embeddings and pooled
    projections of [uncond, cond], the flow-match timestep (sigma x 1000) for both rows, the guided velocity out
    (as :class:`relaydiff.core.denoiser.SD3TransformerDenoiser` and the relay loop compute it)."""

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor, pooled_projections: torch.Tensor,
        guidance_scale: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat([sample, sample])
        t = timestep.reshape(1).expand(2)
        v = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text_embeds,
                             pooled_projections=pooled_projections, return_dict=False)[0]
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)


class SafetyScores(torch.nn.Module):
    """diffusers' ``StableDiffusionSafetyChecker.forward_onnx`` as scores: CLIP pixel values -> (concept, special-care) scores.

    special = cos(image_embeds, special_care_embeds) - special_care_embeds_weights;
    concept = cos(image_embeds, concept_embeds) - concept_embeds_weights + 0.01 * any(special > 0).
    The image is flagged when any concept score is > 0 (relaydiff.runtime.safety.flagged); the scores, not the flag,
    are the graph's outputs, so parity is measured on continuous values.
    """

    def __init__(self, checker: Any) -> None:
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.checker
        pooled = c.vision_model(clip_input)[1]
        embeds = torch.nn.functional.normalize(c.visual_projection(pooled))
        special = embeds @ torch.nn.functional.normalize(c.special_care_embeds).t() - c.special_care_embeds_weights
        adjustment = (special > 0).any(dim=1, keepdim=True).to(special.dtype) * 0.01
        concept = embeds @ torch.nn.functional.normalize(c.concept_embeds).t() - c.concept_embeds_weights + adjustment
        return concept, special
