"""Architectures of the embedded ``tinyshapes`` family, as standard diffusers/transformers models.

One VAE and one text encoder are shared; the host and device UNets differ only in width/depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class VAEArch:
    """Shape of the shared ``AutoencoderKL``."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)  # one entry per level; n-1 downsamples
    layers_per_block: int = 1  # resnets per encoder level (decoder uses one more)
    latent_channels: int = 8  # channels of the latent the UNets denoise (4 lost small-shape detail)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every channel count


@dataclass
class TextArch:
    """Shape of the shared ``CLIPTextModel``."""

    hidden_size: int = 128  # width; also the UNets' cross_attention_dim
    intermediate_size: int = 512  # MLP width
    num_hidden_layers: int = 3  # transformer layers
    num_attention_heads: int = 4  # heads per layer
    max_position_embeddings: int = 32  # longest token sequence, bos/eos included


@dataclass
class UNetArch:
    """Shape of one ``UNet2DConditionModel`` (host or device)."""

    block_out_channels: tuple[int, ...] = (64, 128)  # channels per resolution level
    layers_per_block: int = 1  # resnets (+ attention) per down level
    cross_attn_levels: int = 2  # the first N levels (highest resolution) get cross-attention
    attention_heads: int = 4  # heads in every transformer block
    norm_num_groups: int = 32  # GroupNorm groups; must divide every channel count

    def down_block_types(self) -> tuple[str, ...]:
        n = len(self.block_out_channels)
        if not 0 <= self.cross_attn_levels <= n:
            raise ValueError(f"cross_attn_levels must be in [0, {n}], got {self.cross_attn_levels!r}")
        return tuple(
            "CrossAttnDownBlock2D" if i < self.cross_attn_levels else "DownBlock2D" for i in range(n)
        )

    def up_block_types(self) -> tuple[str, ...]:
        return tuple(
            "CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
            for t in reversed(self.down_block_types())
        )


def host_unet_arch() -> UNetArch:
    """The large host UNet (about 4.3M parameters; ~114 samples/s training at 8x8 on 2 cores)."""
    return UNetArch()


def device_unet_arch() -> UNetArch:
    """The small device UNet (well under a quarter of the host's FLOPs)."""
    return UNetArch(block_out_channels=(24, 48), layers_per_block=1, cross_attn_levels=2,
                    attention_heads=2, norm_num_groups=8)


@dataclass
class FamilyArch:
    """Every architecture choice of a family."""

    resolution: int = 32  # image side in pixels
    vae: VAEArch = field(default_factory=VAEArch)  # shared autoencoder
    text: TextArch = field(default_factory=TextArch)  # shared text encoder
    host: UNetArch = field(default_factory=host_unet_arch)  # large UNet, folder unet/
    device: UNetArch = field(default_factory=device_unet_arch)  # small UNet, folder unet_device/

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FamilyArch":
        def tup(x: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}

        return cls(
            resolution=d["resolution"],
            vae=VAEArch(**tup(d["vae"])),
            text=TextArch(**tup(d["text"])),
            host=UNetArch(**tup(d["host"])),
            device=UNetArch(**tup(d["device"])),
        )


def build_vae(arch: FamilyArch) -> "AutoencoderKL":
    """A freshly initialised VAE (scaling_factor is set after training)."""
    from diffusers import AutoencoderKL

    n = len(arch.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae.block_out_channels,
        layers_per_block=arch.vae.layers_per_block,
        latent_channels=arch.vae.latent_channels,
        norm_num_groups=arch.vae.norm_num_groups,
        sample_size=arch.resolution,
    )


def build_text_encoder(arch: FamilyArch, tokenizer: "CLIPTokenizer") -> "CLIPTextModel":
    """A freshly initialised CLIP text encoder whose special ids match ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = arch.text
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings,
        projection_dim=t.hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_unet(arch: FamilyArch, unet: UNetArch) -> "UNet2DConditionModel":
    """A freshly initialised ``UNet2DConditionModel`` at the family's latent size."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.vae.latent_channels,
        out_channels=arch.vae.latent_channels,
        down_block_types=unet.down_block_types(),
        up_block_types=unet.up_block_types(),
        block_out_channels=unet.block_out_channels,
        layers_per_block=unet.layers_per_block,
        cross_attention_dim=arch.text.hidden_size,
        attention_head_dim=unet.attention_heads,  # diffusers' legacy name: this is the head count
        norm_num_groups=unet.norm_num_groups,
    )


def build_scheduler() -> "DDPMScheduler":
    """The Stable Diffusion noise schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def count_params(module: "torch.nn.Module") -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def unet_flops(arch: FamilyArch, unet: "UNet2DConditionModel", seq_len: int | None = None) -> int:
    """FLOPs of one batch-1 forward of ``unet`` at the latent size (``FlopCounterMode``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    seq = seq_len or arch.text.max_position_embeddings
    sample = torch.zeros(1, arch.vae.latent_channels, arch.latent_size, arch.latent_size)
    ctx = torch.zeros(1, seq, arch.text.hidden_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, torch.tensor([500]), encoder_hidden_states=ctx)
    return int(counter.get_total_flops())
