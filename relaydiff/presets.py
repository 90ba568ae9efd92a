"""Architecture presets with random weights, built in code from public config values and saved as diffusers folders.

- ``tiny``: a tiny host/device pair (16x16 images, 8x8 latents) for fast tests.
- ``sd15-bksdm``: a Stable-Diffusion-1.5-shaped host UNet (859.5M parameters) and a
  BK-SDM-small-shaped device UNet (482.3M: one block per stage, no mid block; Kim et al. 2023)
  sharing the SD VAE, the CLIP ViT-L/14 text encoder shape and the SD noise schedule.
- ``sdxl-ssd1b``: the SDXL base UNet (2.567B, text-time conditioning) as host, the SSD-1B UNet
  (1.331B: fewer transformer layers, a resnet-only mid block; Gupta et al. 2024) as device and
  Segmind-Vega's (745M) as the ``vega`` variant, sharing the SDXL VAE, CLIP ViT-L + OpenCLIP bigG
  (with projection) and the SDXL noise schedule (Euler).
- ``sd35-large-medium``: the SD3.5 Large MMDiT (8.06B) as host, SD3.5 Medium's MMDiT-X (2.24B: dual
  attention in its first 13 layers) as device, sharing the 16-channel SD3 VAE (with shift factor),
  CLIP-L and CLIP-G with projection, T5-XXL and the rectified-flow schedule (shift 3).
- ``tiny-sdxl``, ``tiny-sd3``: tiny configs of those same classes (16x16 images) for tests.

The real-architecture presets are for speed and memory benchmarks and for exercising the code on the
real shapes; their parameter counts come from the meta device (:func:`count_parameters`, no memory),
and building their folders needs the memory of the weights (tens of GB for SD3.5: hence
``relaydiff preset ... --materialize``). The weights are random, so the images are noise.

The tokenizers of a preset are byte-level CLIP BPE vocabularies with no merges (every character is a
token), generated locally, also in the T5 slot of SD3 (a stand-in: T5's own SentencePiece vocabulary
would need a download): nothing is fetched from a hub.
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


SDXL_SCHEDULER: dict[str, Any] = {  # SDXL base's scheduler/scheduler_config.json (EulerDiscreteScheduler)
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3/3.5 FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of an SDXL- or SD3-style preset."""

    cls: str  # transformers class: CLIPTextModel, CLIPTextModelWithProjection or T5EncoderModel
    config: dict[str, Any]  # its CLIPTextConfig / T5Config kwargs (CLIP special-token ids come from the tokenizer)
    max_length: int  # its tokenizer's model_max_length


@dataclass(frozen=True)
class Preset:
    """Configs of a random-weight family preset."""

    name: str
    description: str
    vae: dict[str, Any]  # AutoencoderKL kwargs
    text: dict[str, Any]  # CLIPTextConfig kwargs of an SD-style preset's one encoder (special-token ids from the tokenizer)
    max_length: int  # tokenizer model_max_length = text encoder positions
    host_unet: dict[str, Any]  # the host network's kwargs: UNet2DConditionModel, or for style "sd3" SD3Transformer2DModel
    device_unet: dict[str, Any]  # the device network's kwargs (same class as the host's)
    style: str = "sd"  # "sd", "sdxl" or "sd3" (relaydiff.core.family.pipeline_style)
    text_encoders: tuple[TextEncoderSpec, ...] = ()  # sdxl/sd3: text_encoder, text_encoder_2 (, text_encoder_3)
    scheduler: dict[str, Any] | None = None  # the scheduler config (None: SD_SCHEDULER); its class follows the style
    variants: tuple[tuple[str, dict[str, Any]], ...] = ()  # further device networks: (variant name, kwargs)

    @property
    def network(self) -> str:
        """The denoising network's folder name: ``transformer`` for SD3, else ``unet``."""
        return "transformer" if self.style == "sd3" else "unet"


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


# CLIP ViT-L/14 text tower (SD, SDXL's text_encoder, SD3's text_encoder): openai/clip-vit-large-patch14 config
_CLIP_L: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# OpenCLIP ViT-bigG/14 text tower (SDXL's and SD3's text_encoder_2): laion/CLIP-ViT-bigG-14-laion2B-39B-b160k config
_CLIP_G: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# T5 v1.1 XXL encoder (SD3's text_encoder_3): google/t5-v1_1-xxl config
_T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                               relative_attention_num_buckets=32, relative_attention_max_distance=128,
                               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1)
_SD_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _sdxl_unet(**kw: Any) -> dict[str, Any]:
    """The SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), with changes ``kw``."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True, **kw,
    )


def _sdxl_ssd1b() -> Preset:
    # SSD-1B and Segmind-Vega: SDXL with transformer layers removed and a resnet-only mid block. Depths per
    # attention block as ComfyUI's model detection (comfy/model_detection.py) reads the released checkpoints:
    # SSD-1B input [0,0,2,2,4,4], output [0,0,0,1,1,2,10,4,4]; Vega input [0,0,1,1,2,2], output [0,0,0,1,1,1,2,2,2]
    # (the output list is consumed from its end, lowest resolution first).
    return Preset(
        name="sdxl-ssd1b",
        description="SDXL-base host UNet + SSD-1B device UNet (+ Segmind-Vega variant), SDXL VAE, CLIP-L + OpenCLIP-G",
        vae=dict(_SD_VAE, latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text={}, max_length=77,
        host_unet=_sdxl_unet(),
        device_unet=_sdxl_unet(mid_block_type="UNetMidBlock2D") | {
            "transformer_layers_per_block": (1, 2, 4), "reverse_transformer_layers_per_block": ((4, 4, 10), (2, 1, 1), (1, 1, 1))},
        style="sdxl",
        text_encoders=(TextEncoderSpec("CLIPTextModel", _CLIP_L, 77), TextEncoderSpec("CLIPTextModelWithProjection", _CLIP_G, 77)),
        scheduler=SDXL_SCHEDULER,
        variants=(("vega", _sdxl_unet(mid_block_type="UNetMidBlock2D") | {
            "transformer_layers_per_block": (1, 1, 2), "reverse_transformer_layers_per_block": ((2, 2, 2), (1, 1, 1), (1, 1, 1))}),),
    )


def _sd3_transformer(**kw: Any) -> dict[str, Any]:
    """Shared SD3.5 transformer config values (stabilityai/stable-diffusion-3.5-{large,medium} transformer/config.json)."""
    return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, joint_attention_dim=4096,
                pooled_projection_dim=2048, qk_norm="rms_norm", **kw)


def _sd35_large_medium() -> Preset:
    return Preset(
        name="sd35-large-medium",
        description="SD3.5-Large host MMDiT + SD3.5-Medium (MMDiT-X) device, SD3 16-channel VAE, CLIP-L + CLIP-G + T5-XXL",
        vae=dict(_SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False, force_upcast=True),
        text={}, max_length=77,
        host_unet=_sd3_transformer(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192),
        device_unet=_sd3_transformer(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                                     dual_attention_layers=tuple(range(13))),
        style="sd3",
        text_encoders=(TextEncoderSpec("CLIPTextModelWithProjection", _CLIP_L, 77),
                       TextEncoderSpec("CLIPTextModelWithProjection", _CLIP_G, 77),
                       TextEncoderSpec("T5EncoderModel", _T5_XXL, 256)),  # SD3.5 pipelines' max_sequence_length
        scheduler=SD3_SCHEDULER,
    )


def _tiny_clip(width: int, layers: int = 2) -> dict[str, Any]:
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                max_position_embeddings=16, projection_dim=width)


def _tiny_vae(channels: int, **kw: Any) -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                sample_size=16, **kw)


def _tiny_sdxl() -> Preset:
    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    return Preset(
        name="tiny-sdxl",
        description="tiny SDXL-style pair for tests: text-time UNets, two CLIP encoders (the second with projection)",
        vae=_tiny_vae(4, scaling_factor=0.13025), text={}, max_length=16,
        host_unet=dict(unet, transformer_layers_per_block=(1, 2)),
        device_unet=dict(unet, transformer_layers_per_block=(1, 1), mid_block_type="UNetMidBlock2D"),  # SSD-1B-like
        style="sdxl",
        text_encoders=(TextEncoderSpec("CLIPTextModel", _tiny_clip(16), 16),
                       TextEncoderSpec("CLIPTextModelWithProjection", _tiny_clip(16), 16)),
        scheduler=SDXL_SCHEDULER,
    )


def _tiny_sd3() -> Preset:
    net = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
               qk_norm="rms_norm")
    return Preset(
        name="tiny-sd3",
        description="tiny SD3-style pair for tests: MMDiT host, MMDiT-X device, 16-channel VAE with shift, CLIP-L/G + T5",
        vae=_tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text={}, max_length=16,
        host_unet=dict(net, num_layers=2),
        device_unet=dict(net, num_layers=1, dual_attention_layers=(0,)),  # SD3.5-Medium-like
        style="sd3",
        text_encoders=(TextEncoderSpec("CLIPTextModelWithProjection", _tiny_clip(16), 16),
                       TextEncoderSpec("CLIPTextModelWithProjection", _tiny_clip(16), 16),
                       TextEncoderSpec("T5EncoderModel", dict(vocab_size=600, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                              num_heads=4, relative_attention_num_buckets=8,
                                                              feed_forward_proj="gated-gelu"), 16)),
        scheduler=SD3_SCHEDULER,
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": _tiny, "sd15-bksdm": _sd15_bksdm, "sdxl-ssd1b": _sdxl_ssd1b, "sd35-large-medium": _sd35_large_medium,
    "tiny-sdxl": _tiny_sdxl, "tiny-sd3": _tiny_sd3,
}


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
    if preset.style != "sd":
        _build_pipeline_preset(preset, out, getattr(torch, dtype))
        _write_family(preset, out, seed, dtype)
        return out
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
    _write_family(preset, out, seed, dtype)
    return out


def _write_family(preset: Preset, out: Path, seed: int, dtype: str) -> None:
    net = preset.network
    family = {
        "format": FAMILY_FORMAT,
        "name": f"preset-{preset.name}",
        "description": preset.description,
        "variants": {"host": net, "device": f"{net}_device", **{v: f"{net}_{v}" for v, _ in preset.variants}},
        "default_host": "host",
        "default_device": "device",
        "random_weights": True,
        "seed": seed,
        "dtype": dtype,
    }
    (out / FAMILY_FILE).write_text(json.dumps(family, indent=2) + "\n")


def _network_class(preset: Preset) -> Any:
    import diffusers

    return diffusers.SD3Transformer2DModel if preset.style == "sd3" else diffusers.UNet2DConditionModel


def _text_encoder(spec: TextEncoderSpec, tokenizer: Any | None) -> Any:
    """A text encoder of ``spec`` (random weights); CLIP special-token ids from ``tokenizer`` when given."""
    import transformers

    if spec.cls == "T5EncoderModel":
        return transformers.T5EncoderModel(transformers.T5Config(**spec.config))
    kwargs = dict(spec.config)
    if tokenizer is not None:
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        kwargs.setdefault("vocab_size", 49408)
    return getattr(transformers, spec.cls)(transformers.CLIPTextConfig(**kwargs))


def _build_pipeline_preset(preset: Preset, out: Path, dtype: Any) -> None:
    """Write an SDXL- or SD3-style preset: the diffusers pipeline folder of the host (its own model_index.json),
    then each device network beside it. Modules are built, saved and freed one at a time where possible."""
    import diffusers

    tokenizers = [write_char_tokenizer(out / f"_tokenizer{i}", spec.max_length) for i, spec in enumerate(preset.text_encoders)]
    encoders = [_text_encoder(spec, tok).to(dtype) for spec, tok in zip(preset.text_encoders, tokenizers)]
    vae = diffusers.AutoencoderKL(**preset.vae).to(dtype)
    net = _network_class(preset)(**preset.host_unet).to(dtype)
    parts: dict[str, Any] = {"vae": vae}
    for i, (enc, tok) in enumerate(zip(encoders, tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = enc, tok
    if preset.style == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**(preset.scheduler or {})), **parts)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            unet=net, scheduler=diffusers.EulerDiscreteScheduler(**(preset.scheduler or {})), **parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    del pipe, net, encoders, parts, vae
    import shutil

    for i in range(len(tokenizers)):
        shutil.rmtree(out / f"_tokenizer{i}")
    for variant, kwargs in (("device", preset.device_unet), *preset.variants):
        _network_class(preset)(**kwargs).to(dtype).save_pretrained(str(out / f"{preset.network}_{variant}"), safe_serialization=True)


def count_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a preset's modules, built on the meta device (no memory, no weights).

    Keys: ``host_<net>``, ``device_<net>`` and ``<variant>_<net>`` (net: ``unet``, or ``transformer`` for SD3),
    ``vae`` and each text encoder's folder name (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``).
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset(name)
    net_cls, net = _network_class(preset), preset.network
    with torch.device("meta"):
        modules = {f"host_{net}": net_cls(**preset.host_unet), f"device_{net}": net_cls(**preset.device_unet)}
        modules.update({f"{v}_{net}": net_cls(**kw) for v, kw in preset.variants})
        modules["vae"] = AutoencoderKL(**preset.vae)
        if preset.style == "sd":
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig(**{"vocab_size": 49408, **preset.text}))
        for i, spec in enumerate(preset.text_encoders):
            modules["text_encoder" + ("" if i == 0 else f"_{i + 1}")] = _text_encoder(spec, None)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
