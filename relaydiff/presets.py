"""Architecture presets with random weights, built in code from public config values and saved as diffusers folders.

- ``tiny``: a tiny host/device pair (16x16 images, 8x8 latents) for fast tests.
- ``sd15-bksdm``: a Stable-Diffusion-1.5-shaped host UNet (859.5M parameters) and a
  BK-SDM-small-shaped device UNet (482.3M: one block per stage, no mid block; Kim et al. 2023)
  sharing the SD VAE, the CLIP ViT-L/14 text encoder shape and the SD noise schedule.
  For speed and memory benchmarks and for exercising the code on real architectures; the
  weights are random, so the images are noise.

The tokenizer of a preset is a byte-level CLIP BPE vocabulary with no merges (every character
is a token), generated locally: nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.family import FAMILY_FILE, FAMILY_FORMAT

SD_SCHEDULER: dict[str, Any] = {  # the SD 1.x noise schedule (DDIM sampler config as SD ships it)
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class Preset:
    """Configs of a random-weight family preset."""

    name: str
    description: str
    vae: dict[str, Any]  # AutoencoderKL kwargs
    text: dict[str, Any]  # CLIPTextConfig kwargs (ids of special tokens are filled from the tokenizer)
    max_length: int  # tokenizer model_max_length = text encoder positions
    host_unet: dict[str, Any]  # UNet2DConditionModel kwargs of the host
    device_unet: dict[str, Any]  # UNet2DConditionModel kwargs of the device


def _tiny() -> Preset:
    unet = dict(
        sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return Preset(
        name="tiny",
        description="tiny random pair for tests: 16x16 images, 8x8x4 latents",
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, sample_size=16,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
        max_length=16,
        host_unet=dict(unet, block_out_channels=(32, 64), layers_per_block=2),
        device_unet=dict(unet, block_out_channels=(16, 32), layers_per_block=1, mid_block_type=None),
    )


def _sd15_bksdm() -> Preset:
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return Preset(
        name="sd15-bksdm",
        description="SD-1.5-shaped host UNet + BK-SDM-small-shaped device UNet, SD VAE, CLIP ViT-L/14 text shape",
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512, scaling_factor=0.18215,
        ),
        text=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ),
        max_length=77,
        host_unet=dict(unet, layers_per_block=2),
        device_unet=dict(unet, layers_per_block=1, mid_block_type=None),
    )


PRESETS: dict[str, Callable[[], Preset]] = {"tiny": _tiny, "sd15-bksdm": _sd15_bksdm}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; raises RelaydiffError listing the known ones."""
    if name not in PRESETS:
        raise RelaydiffError(f"unknown preset {name!r}; expected one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def write_char_tokenizer(out_dir: Path, max_length: int) -> Any:
    """Write a byte-level CLIP tokenizer with no merges (every character a token) and return it loaded."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab_file=str(out_dir / "vocab.json"), merges_file=str(out_dir / "merges.txt"), model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(str(out_dir))
    return tok


def build_preset(name: str, out: str | Path, *, seed: int = 0, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Build preset ``name`` with random weights (seeded) and save it as a family folder at ``out``.

    The folder is a StableDiffusionPipeline folder for the host (``unet/``) plus the device
    UNet in ``unet_device/`` and a ``family.json`` naming both variants.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset(name)
    if dtype not in ("float32", "float16"):
        raise RelaydiffError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RelaydiffError(f"output folder '{out}' is not empty (pass overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(out / "tokenizer", preset.max_length)
    text_kwargs = dict(preset.text)
    text_kwargs.setdefault("vocab_size", len(tokenizer))
    text_cfg = CLIPTextConfig(
        **text_kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tdtype = getattr(torch, dtype)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**preset.vae).to(tdtype),
        text_encoder=CLIPTextModel(text_cfg).to(tdtype),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**preset.host_unet).to(tdtype),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,  # type: ignore[arg-type]  # diffusers annotates these without Optional; None is its documented "no checker"
        feature_extractor=None,  # type: ignore[arg-type]  # as safety_checker
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    UNet2DConditionModel(**preset.device_unet).to(tdtype).save_pretrained(str(out / "unet_device"), safe_serialization=True)
    family = {
        "format": FAMILY_FORMAT,
        "name": f"preset-{preset.name}",
        "description": preset.description,
        "variants": {"host": "unet", "device": "unet_device"},
        "default_host": "host",
        "default_device": "device",
        "random_weights": True,
        "seed": seed,
        "dtype": dtype,
    }
    (out / FAMILY_FILE).write_text(json.dumps(family, indent=2) + "\n")
    return out


def count_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a preset's modules, built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset(name)
    with torch.device("meta"):
        modules = {
            "host_unet": UNet2DConditionModel(**preset.host_unet),
            "device_unet": UNet2DConditionModel(**preset.device_unet),
            "vae": AutoencoderKL(**preset.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**{"vocab_size": 49408, **preset.text})),
        }
    return {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
