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
