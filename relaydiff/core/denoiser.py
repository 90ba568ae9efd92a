"""The one interface every denoising model is used through: ``(latent, timestep, Conditioning) -> model output``.

A torch UNet (:class:`UNetDenoiser`), an SD3 transformer (:class:`SD3TransformerDenoiser`), an exported ``unet_step`` artifact
(``relaydiff.runtime.artifact_denoiser``) and a recording proxy used for calibration all implement
:class:`Denoiser`; the relay loop, the student loop, calibration and parity call nothing else. A model
that computes classifier-free guidance itself (an exported ``unet_step`` bakes it into the graph) also
implements :class:`GuidedDenoiser`, and the loop then hands it both conditionings instead of a batch.

:class:`Conditioning` holds what a model is conditioned on. SD 1.x/2.x use the per-token text
embeddings only; SDXL adds pooled text embeddings and size/crop time ids, SD3 pooled projections, so
those families add fields' values, not code paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.schedulers import noise_schedule as schedule_of

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel


@dataclass(frozen=True)
class Conditioning:
    """What one denoiser call is conditioned on; every tensor has the batch size first."""

    text_embeds: torch.Tensor  # (B, L, D) per-token text embeddings the model cross-attends to
    pooled_text_embeds: torch.Tensor | None = None  # (B, P) pooled text embeddings (SDXL's added "text_embeds")
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL micro-conditioning: original size, crop corner, target size
    pooled_projections: torch.Tensor | None = None  # (B, P) SD3's pooled text projections

    def __post_init__(self) -> None:
        if self.text_embeds.ndim != 3:
            raise RelaydiffError(f"text embeddings must be (B, L, D), got shape {tuple(self.text_embeds.shape)}")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if value is not None and value.shape[0] != self.batch:
                raise RelaydiffError(f"conditioning {f.name} has batch {value.shape[0]}; the text embeddings have {self.batch}")

    @property
    def batch(self) -> int:
        return int(self.text_embeds.shape[0])

    def float(self) -> Conditioning:
        """The same conditioning in float32."""
        return replace(self, **{f.name: getattr(self, f.name).float() for f in fields(self) if getattr(self, f.name) is not None})

    @classmethod
    def cat(cls, parts: Sequence[Conditioning]) -> Conditioning:
        """The conditionings stacked along the batch (e.g. [uncond, cond] for a CFG batch); all must carry the same fields."""
        present = [{f.name for f in fields(p) if getattr(p, f.name) is not None} for p in parts]
        if any(p != present[0] for p in present):
            raise RelaydiffError(f"cannot batch conditionings with different fields: {[sorted(p) for p in present]}")
        return cls(**{name: torch.cat([getattr(p, name) for p in parts]) for name in present[0]})


@dataclass(frozen=True)
class LatentSpec:
    """The latent space a denoiser works in: shape, VAE scaling, what it predicts and the noise schedule it was trained on."""

    channels: int  # C of the (B, C, h, w) latent
    sample_size: tuple[int, int]  # the latent (h, w) the model was built for; the default image is this times the VAE factor
    scaling_factor: float  # the VAE's latent scaling: the denoiser sees (z - shift_factor) * scaling_factor
    shift_factor: float | None  # the VAE's latent shift (None: no shift, as in SD 1.x)
    prediction_type: str  # what the model outputs: "epsilon", "v_prediction", "sample", or "flow" (a velocity)
    noise_schedule: tuple[tuple[str, Any], ...]  # the training schedule as (key, value): relaydiff.core.schedulers.noise_schedule
    patch_size: int = 1  # latent pixels per token side (an SD3 transformer's patch_size; 1 for a UNet)

    @property
    def schedule(self) -> dict[str, Any]:
        """The noise schedule as a dict keyed like a diffusers scheduler config."""
        return dict(self.noise_schedule)

    @property
    def is_flow(self) -> bool:
        """A rectified-flow latent space (SD3-style): the model predicts a velocity on a flow schedule."""
        return self.prediction_type == "flow"

    @classmethod
    def from_configs(cls, unet: Mapping[str, Any], vae: Mapping[str, Any], scheduler: Mapping[str, Any]) -> LatentSpec:
        """The spec of a diffusers UNet or SD3 transformer on a family's VAE and noise schedule (configs as dicts)."""
        size = unet.get("sample_size", 64)
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        shift = vae.get("shift_factor")
        schedule = schedule_of(scheduler)
        return cls(
            channels=int(unet.get("in_channels", 4)),
            sample_size=hw,
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
            prediction_type=str(schedule["prediction_type"]),
            noise_schedule=tuple((k, _frozen(v)) for k, v in schedule.items()),
            patch_size=int(unet.get("patch_size", 1)),
        )


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


@runtime_checkable
class Denoiser(Protocol):
    """A denoising model: the latent at a timestep and its conditioning in, the model's prediction out (same shape)."""

    @property
    def latent_spec(self) -> LatentSpec:
        """The latent space it works in."""
        ...

    @property
    def text_embed_dim(self) -> int:
        """D of the (B, L, D) text embeddings it takes."""
        ...

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The model output for each batch row (its ``latent_spec.prediction_type``)."""
        ...


@runtime_checkable
class GuidedDenoiser(Denoiser, Protocol):
    """A denoiser that computes classifier-free guidance itself: one call per step instead of a [uncond, cond] batch."""

    def guided(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning,
               guidance_scale: float) -> torch.Tensor:
        """out_uncond + g * (out_cond - out_uncond) (Ho & Salimans 2022, eq. 6) for the batch-1 ``latent``."""
        ...


class UNetDenoiser:
    """A diffusers ``UNet2DConditionModel`` as a :class:`Denoiser`.

    SDXL's pooled text embeddings and time ids go in as the UNet's ``added_cond_kwargs``; pooled
    projections belong to SD3's transformer, which a UNet does not take.
    """

    def __init__(self, unet: Any, latent_spec: LatentSpec) -> None:
        """
        Args:
            unet: a diffusers UNet2DConditionModel (any module called as ``unet(x, t, encoder_hidden_states=...)``).
            latent_spec: its latent space (see :func:`unet_denoiser` for a loaded family model).
        """
        self.unet = unet
        self._spec = latent_spec
        self._text_dim = int(unet.config.cross_attention_dim)

    @property
    def latent_spec(self) -> LatentSpec:
        return self._spec

    @property
    def text_embed_dim(self) -> int:
        return self._text_dim

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if conditioning.pooled_projections is not None:
            raise RelaydiffError("a UNet takes no pooled projections (an SD3 transformer does)")
        added = {name: value for name, value in (("text_embeds", conditioning.pooled_text_embeds),
                                                 ("time_ids", conditioning.time_ids)) if value is not None}
        kwargs: dict[str, Any] = {"added_cond_kwargs": added} if added else {}
        out: torch.Tensor = self.unet(latent, timestep, encoder_hidden_states=conditioning.text_embeds, **kwargs).sample
        return out


class SD3TransformerDenoiser:
    """A diffusers ``SD3Transformer2DModel`` (MMDiT) as a :class:`Denoiser`: per-token joint text embeddings
    (CLIP-L + CLIP-G padded to the T5 width, then T5) and the pooled projections in, the flow velocity out.

    The timestep is the flow-match scheduler's (sigma x num_train_timesteps), one per batch row, as in
    diffusers' ``StableDiffusion3Pipeline``.
    """

    def __init__(self, transformer: Any, latent_spec: LatentSpec) -> None:
        """
        Args:
            transformer: a diffusers SD3Transformer2DModel.
            latent_spec: its latent space (a flow schedule; see :func:`denoiser_of`).

        Raises:
            RelaydiffError: the latent spec is not a flow one (an SD3 transformer predicts a velocity).
        """
        if not latent_spec.is_flow:
            raise RelaydiffError(f"an SD3 transformer predicts a flow; its latent spec says {latent_spec.prediction_type!r}")
        self.transformer = transformer
        self._spec = latent_spec
        self._text_dim = int(transformer.config.joint_attention_dim)

    @property
    def latent_spec(self) -> LatentSpec:
        return self._spec

    @property
    def text_embed_dim(self) -> int:
        return self._text_dim

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        if conditioning.pooled_projections is None:
            raise RelaydiffError("an SD3 transformer needs pooled projections in its conditioning")
        if conditioning.pooled_text_embeds is not None or conditioning.time_ids is not None:
            raise RelaydiffError("an SD3 transformer takes no pooled text embeddings or time ids (an SDXL UNet does)")
        t = torch.as_tensor(timestep).reshape(-1).expand(latent.shape[0])
        out: torch.Tensor = self.transformer(hidden_states=latent, timestep=t, encoder_hidden_states=conditioning.text_embeds,
                                             pooled_projections=conditioning.pooled_projections, return_dict=False)[0]
        return out


def latent_spec_of(model: LoadedModel) -> LatentSpec:
    """The latent space of a loaded family model (its UNet, VAE and noise schedule configs)."""
    return LatentSpec.from_configs(dict(model.unet.config), dict(model.vae.config), model.scheduler_config)


def unet_denoiser(model: LoadedModel) -> UNetDenoiser:
    """The UNet of a loaded family model as a :class:`Denoiser`."""
    return UNetDenoiser(model.unet, latent_spec_of(model))


def denoiser_of(model: LoadedModel) -> UNetDenoiser | SD3TransformerDenoiser:
    """The denoising network of a loaded family model as a :class:`Denoiser`: an SD3-style family's transformer,
    otherwise its UNet (SD 1.x/2.x, and SDXL with its added text-time conditioning)."""
    if model.style == "sd3":
        return SD3TransformerDenoiser(model.unet, latent_spec_of(model))
    return unet_denoiser(model)
