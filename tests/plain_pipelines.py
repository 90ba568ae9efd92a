"""Plain diffusers pipeline folders (no family.json) with tiny random weights, as a user brings their own models."""

from __future__ import annotations

from pathlib import Path

PNDM = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}  # as SD-1.5 and BK-SDM ship it


def build_pipeline(out: Path, *, seed: int, unet: dict, vae_seed: int = 0, vae_scaling: float = 0.18215) -> Path:
    """A plain StableDiffusionPipeline folder (PNDM scheduler, the tiny preset's VAE and text encoder) in ``out``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from relaydiff.presets import get_preset, write_char_tokenizer

    preset = get_preset("tiny")
    tokenizer = write_char_tokenizer(out / "_tok", preset.max_length)
    torch.manual_seed(vae_seed)  # the shared parts: same seed, same weights in both folders
    vae = AutoencoderKL(**{**preset.vae, "scaling_factor": vae_scaling})
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**preset.text, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel(**unet),
                                   scheduler=PNDMScheduler(**PNDM), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_pair(root: Path) -> dict[str, Path]:
    """host (SD-1.5-shaped), device (smaller UNet) and bad (the device with another VAE: cannot relay) folders."""
    from relaydiff.presets import get_preset

    preset = get_preset("tiny")
    return {
        "host": build_pipeline(root / "sd15", seed=1, unet=preset.host_unet),
        "device": build_pipeline(root / "bksdm", seed=2, unet=preset.device_unet),
        # same configs, other VAE weights and scaling factor: cannot relay
        "bad": build_pipeline(root / "other-vae", seed=2, unet=preset.device_unet, vae_seed=5, vae_scaling=0.2),
    }
