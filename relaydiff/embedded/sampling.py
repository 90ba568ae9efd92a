"""A minimal DDIM sampler with classifier-free guidance, for checks during and after training.

Written here rather than calling ``StableDiffusionPipeline`` so the host and device UNets (and a
host→device hand-over at any step) can be sampled with the same loop and shared components.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


def encode_prompts(
    tokenizer: "CLIPTokenizer", text_encoder: "CLIPTextModel", prompts: Sequence[str]
) -> "torch.Tensor":
    """Last hidden states for ``prompts``, padded to ``model_max_length`` as Stable Diffusion does."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def generate(
    unets: Sequence["UNet2DConditionModel"],
    text_encoder: "CLIPTextModel",
    tokenizer: "CLIPTokenizer",
    vae: "AutoencoderKL",
    scheduler_config: dict,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    switch_fraction: float = 1.0,
) -> "np.ndarray":
    """Sample images (``(n, H, W, 3)`` uint8) for ``prompts`` with DDIM.

    Args:
        unets: one UNet, or ``(host, device)``: the first runs the first ``switch_fraction`` of
            the steps, the second the rest.
        scheduler_config: a diffusers scheduler config (noise schedule of training).
        switch_fraction: share of steps run by ``unets[0]`` when two UNets are given.
    Raises:
        ValueError: on an empty ``unets`` or ``switch_fraction`` outside [0, 1].
    """
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    if not 1 <= len(unets) <= 2:
        raise ValueError(f"expected one or two UNets, got {len(unets)!r}")
    if not 0.0 <= switch_fraction <= 1.0:
        raise ValueError(f"switch_fraction must be in [0, 1], got {switch_fraction!r}")
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    n = len(prompts)
    u0 = unets[0]
    size = u0.config["sample_size"]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = encode_prompts(tokenizer, text_encoder, prompts)
        uncond = encode_prompts(tokenizer, text_encoder, [""] * n)
        ctx = torch.cat([uncond, cond])
        latents = torch.randn(n, u0.config["in_channels"], size, size, generator=gen)
        n_first = round(switch_fraction * steps) if len(unets) == 2 else steps
        for i, t in enumerate(sched.timesteps):
            unet = unets[0] if i < n_first else unets[-1]
            eps = unet(torch.cat([latents, latents]), t, encoder_hidden_states=ctx).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents).prev_sample
        images = vae.decode(latents / vae.config["scaling_factor"]).sample
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


def image_grid(images: "np.ndarray", cols: int = 8, scale: int = 2) -> "np.ndarray":
    """Tile ``(n, H, W, 3)`` images into one uint8 array, upscaled by ``scale`` (nearest)."""
    import numpy as np

    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + 2) : r * (h + 2) + h, q * (w + 2) : q * (w + 2) + w] = img
    return grid.repeat(scale, 0).repeat(scale, 1)
