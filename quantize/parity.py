"""How far a quantized device half drifts from the fp32 torch device half, measured on real relays.

Two figures, both against the torch fp32 reference:

- *denoiser error*: the ``unet_step`` artifact on inputs recorded along fp32 relayed trajectories
  (device steps [k, N) only), max abs error and PSNR of ``noise_pred``;
- *final image PSNR*: the whole device half run with the artifact's UNet (and optionally its decoder)
  from the same host hand-off, so that errors compound over the device steps as they would on a phone.

The device loop is ``relaydiff.core.relay.resume`` itself with the artifact as the device side's denoiser
(:func:`artifact_side`), so the sampler math is the one the relay uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from relaydiff.core.metrics import image_psnr, psnr_db
from relaydiff.quantize.calibration import CalibrationConfig, CalibrationSet, capture, hand_offs
from relaydiff.runtime.artifact_denoiser import ArtifactDenoiser
from relaydiff.runtime.sessions import Runner

if TYPE_CHECKING:

    from relaydiff.core.family import LoadedModel
    from relaydiff.core.relay import RelaySide


@dataclass(frozen=True)
class RelayParity:
    """Figures of one quantized device half against fp32 torch, on relays not seen in calibration."""

    relay_step: int  # k of the evaluation relays
    steps: int  # N
    prompts: int  # number of evaluation relays
    denoiser_max_abs: float  # max |noise_pred - torch| over every device step of every relay (teacher-forced)
    denoiser_psnr_db: float  # worst per-call PSNR of noise_pred
    image_psnr_db: float  # worst final-image PSNR (images in [0, 1]) after the whole device half
    image_psnr_db_mean: float  # mean final-image PSNR
    latent_max_abs: float  # max |final latent - torch final latent|

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def eval_config(relay_step: int, steps: int, prompts: int = 3, prompt_seed: int = 1000, guidance_scale: float = 5.0) -> CalibrationConfig:
    """Evaluation relays: like calibration ones but other prompts and seeds (prompt_seed 1000 by default)."""
    return CalibrationConfig(mode="relay", relay_steps=(relay_step,), steps=steps, prompts=prompts, prompt_seed=prompt_seed,
                             guidance_scale=guidance_scale, seed=prompt_seed)


def denoiser_error(device: LoadedModel, run: Runner, inputs: CalibrationSet) -> tuple[float, float]:
    """(max abs error, worst PSNR) of ``run`` vs torch ``unet_step`` on recorded inputs."""
    from relaydiff.export.base import torch_reference
    from relaydiff.export.components import component_for

    comp = component_for("unet_step", device)
    module = comp.module(device)
    sig = comp.signature(device)
    worst_abs, worst_psnr = 0.0, float("inf")
    for x in inputs.for_component("unet_step"):
        ref = torch_reference(module, x, sig)["noise_pred"]
        got = run(x)["noise_pred"]
        worst_abs = max(worst_abs, float(np.abs(got - ref).max()))
        worst_psnr = min(worst_psnr, psnr_db(got, ref))
    return worst_abs, worst_psnr


def relay_parity(
    host: LoadedModel,
    device: LoadedModel,
    unet: Runner,
    *,
    decoder: Runner | None = None,
    config: CalibrationConfig | None = None,
) -> RelayParity:
    """Run evaluation relays with the torch fp32 device half and with ``unet`` (and ``decoder``); compare.

    Args:
        unet: runs the ``unet_step`` component (e.g. an INT8 ONNX session).
        decoder: runs ``vae_decoder``; default the torch fp32 decoder.
        config: the evaluation relays (default :func:`eval_config` (8, 25)).
    """
    from relaydiff.core.relay import resume
    from relaydiff.export.base import torch_reference
    from relaydiff.export.components import get_component

    config = config or eval_config(8, 25)
    dec = get_component("vae_decoder")
    dec_module = dec.module(device)

    def torch_decode(latent: np.ndarray) -> np.ndarray:
        return torch_reference(dec_module, {"latent": latent}, dec.signature(device))["image"]

    recorded = capture(host, device, config)  # fp32 trajectories: teacher-forced denoiser inputs
    d_abs, d_psnr = denoiser_error(device, unet, recorded)
    psnrs, lat_err = [], 0.0
    for i, (_prompt, state) in enumerate(hand_offs(host, device, config)):
        ref_latent = recorded.for_component("vae_decoder")[i]["latent"]
        latent = resume(artifact_side(device, unet), state).latents.float().numpy()
        lat_err = max(lat_err, float(np.abs(latent - ref_latent).max()))
        image = (decoder({"latent": latent})["image"] if decoder is not None else torch_decode(latent))
        psnrs.append(min(image_psnr(image, torch_decode(ref_latent)), 100.0))  # capped: identical images
    return RelayParity(
        relay_step=min(config.relay_steps), steps=config.steps, prompts=config.prompts,
        denoiser_max_abs=d_abs, denoiser_psnr_db=d_psnr, image_psnr_db=min(psnrs),
        image_psnr_db_mean=float(np.mean(psnrs)), latent_max_abs=lat_err,
    )


def artifact_side(device: LoadedModel, unet: Runner) -> RelaySide:
    """The torch device model's relay side with ``unet`` (its ``unet_step`` artifact, run by a session) as the denoiser."""
    from relaydiff.core.relay import relay_side

    side = relay_side(device)
    spec, dim = side.denoiser.latent_spec, side.denoiser.text_embed_dim
    return dataclasses.replace(side, denoiser=ArtifactDenoiser(unet, spec, dim, distilled=is_student(device)))


def is_student(model: Any) -> bool:
    """True when ``model`` is a distilled student (its ``unet_step`` artifacts take one conditional pass)."""
    return getattr(model, "student", None) is not None


def relay_images(host: LoadedModel, device: LoadedModel, unet: Runner, decoder: Runner | None, prompts: list[str] | tuple[str, ...],
                 relay_step: int, steps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(torch fp32 images, artifact images), uint8 HWC, of one relay per prompt (seed = its index) from the same host hand-off.

    The artifact side runs ``unet`` (and ``decoder``, else the torch decoder) through ``relay.resume``; this is what
    the prompt-accuracy gate (``relaydiff.runtime.gates``) scores.
    """
    from relaydiff.core.relay import RelayRequest, decode, resume, snapshots

    ref_images, art_images = [], []
    for i, prompt in enumerate(prompts):
        state, _ = snapshots(host, RelayRequest(prompt, relay_step=relay_step, steps=steps, seed=i), [relay_step])[relay_step]
        ref_images.append(decode(device, resume(device, state).latents)[0])
        latents = resume(artifact_side(device, unet), state).latents
        if decoder is None:
            art_images.append(decode(device, latents)[0])
        else:
            image = decoder({"latent": latents.float().numpy()})["image"][0]
            art_images.append((np.transpose(image, (1, 2, 0)) * 255).round().astype(np.uint8))
    return ref_images, art_images
