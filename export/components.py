"""The device-side components that ship to phones, each declared once: inputs, outputs, tolerances, example inputs.

A component is a small frozen dataclass registered by name with :func:`register_component`.
Shapes are fixed per family: named dimensions (``"C"``, ``"h"``, ``"L"``...) are filled from the
family's configs by :func:`family_dims`. Example inputs are realistic (a real prompt through the
family's own tokenizer and text encoder; a VAE-encoded picture noised by the family's schedule),
because parity on random inputs can hide errors that only show on the distributions the model
sees. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from relaydiff.core.metrics import Tolerance
from relaydiff.export.base import Registry, Signature, TensorSpec, UnknownNameError, torch_reference
from relaydiff.runtime.gates import FP32_MAX_ABS

if TYPE_CHECKING:
    import torch

    from relaydiff.core.family import LoadedModel

FP32 = Tolerance(max_abs=FP32_MAX_ABS)  # the fp32 bar: the denoiser output within 1e-3 of torch (relaydiff.runtime.gates)
FP16 = Tolerance(min_psnr_db=35.0)  # fp16 (CoreML): apple/ml-stable-diffusion's PSNR floor


@dataclass(frozen=True)
class OptimumSource:
    """Says a component is a plain submodule that optimum's ONNX exporter knows (it is then preferred)."""

    submodel: str  # attribute of LoadedModel holding the module, e.g. "text_encoder"
    task: str  # optimum task, e.g. "feature-extraction"
    library: str  # optimum library name the config is registered under, e.g. "diffusers"
    shapes: Mapping[str, int | str]  # optimum dummy-input shape name -> int or a family dimension name


@dataclass(frozen=True)
class Component(abc.ABC):
    """One exportable function of the device model."""

    name: str  # registry name, e.g. "unet_step"
    description: str  # one line, written into artifact metadata
    inputs: tuple[TensorSpec, ...]  # in call order; named dimensions come from family_dims
    outputs: tuple[TensorSpec, ...]
    tolerances: Mapping[str, Tolerance]  # compute precision ("fp32", "fp16", ...) -> validation bar
    optimum: OptimumSource | None  # set when optimum.exporters.onnx can export the component as is

    @abc.abstractmethod
    def module(self, model: LoadedModel) -> torch.nn.Module:
        """The torch module to export (eval mode), whose forward takes the declared inputs in order."""

    @abc.abstractmethod
    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        """Realistic inputs, by declared name, matching the declared dtypes and shapes."""

    def dims(self, model: LoadedModel) -> dict[str, int]:
        """Values of the named dimensions for ``model``'s family."""
        return family_dims(model)

    def signature(self, model: LoadedModel) -> Signature:
        """The declared inputs/outputs with every dimension fixed for ``model``'s family."""
        d = self.dims(model)
        return Signature(tuple(s.resolve(d) for s in self.inputs), tuple(s.resolve(d) for s in self.outputs))

    def tolerance(self, precision: str) -> Tolerance:
        """The validation bar at ``precision``.

        Raises:
            UnknownNameError: no tolerance is declared for ``precision`` (lists the declared ones).
        """
        if precision not in self.tolerances:
            raise UnknownNameError(
                f"component {self.name!r} declares no tolerance for precision {precision!r}; "
                f"expected one of: {', '.join(sorted(self.tolerances))}"
            )
        return self.tolerances[precision]

    def reference(self, model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The torch fp32 outputs on ``inputs``, by declared name."""
        return torch_reference(self.module(model), inputs, self.signature(model))


COMPONENTS: Registry[Component] = Registry("component")

C = TypeVar("C", bound=type[Component])


def register_component(cls: C) -> C:
    """Class decorator: register the component with its default declaration under its ``name``."""
    instance = cls()  # type: ignore[call-arg]
    COMPONENTS.add(instance.name, instance)
    return cls


def get_component(name: str) -> Component:
    """The registered component ``name``.

    Raises:
        UnknownNameError: ``name`` is not registered (lists the known ones).
    """
    return COMPONENTS.get(name)


def list_components() -> list[str]:
    return COMPONENTS.names()


def family_dims(model: LoadedModel) -> dict[str, int]:
    """The named dimensions of a family: latent C/h/w, image H/W, text length L and width D."""
    size = model.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    f = model.vae_scale_factor
    return {
        "C": int(model.unet.config.in_channels),
        "h": h,
        "w": w,
        "H": h * f,
        "W": w * f,
        "L": int(model.tokenizer.model_max_length),
        "D": int(model.text_encoder.config.hidden_size),
        "B": 2,  # the batch of a CFG-as-batch UNet call: [uncond, cond]
    }


# ------------------------------------------------------------------------------------- realistic inputs

EXAMPLE_PROMPT = "a large red circle left of a small blue square"


def example_token_ids(model: LoadedModel, prompt: str = EXAMPLE_PROMPT) -> np.ndarray:
    """Token ids (1, L) int32 of ``prompt``, padded as the relay pads them."""
    tok = model.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return ids["input_ids"].astype(np.int32)


def example_text_embeds(model: LoadedModel, prompt: str = EXAMPLE_PROMPT, negative_prompt: str = "") -> np.ndarray:
    """[uncond, cond] text embeddings (2, L, D) from the family's own tokenizer and text encoder."""
    from relaydiff.core.relay import encode_prompt

    cond, uncond = encode_prompt(model, prompt, negative_prompt)
    return np.concatenate([uncond.numpy(), cond.numpy()]).astype(np.float32)


def example_picture(H: int, W: int) -> np.ndarray:
    """A drawn picture (3, H, W) in [0, 1]: a red disc and a blue square on light grey."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / np.float32(max(H, W))
    img = np.full((3, H, W), 0.8, np.float32)  # light grey background in [0, 1]
    disc = (xx - 0.3) ** 2 + (yy - 0.5) ** 2 < 0.2**2
    square = (np.abs(xx - 0.75) < 0.1) & (np.abs(yy - 0.5) < 0.1)
    img[:, disc] = np.array([0.9, 0.1, 0.1], np.float32)[:, None]
    img[:, square] = np.array([0.1, 0.2, 0.9], np.float32)[:, None]
    return img


def example_clean_latent(model: LoadedModel) -> np.ndarray:
    """A clean latent (1, C, h, w): a drawn picture (red disc, blue square) encoded by the family's VAE, scaled."""
    import torch

    d = family_dims(model)
    img = example_picture(d["H"], d["W"])
    cfg = model.vae.config
    with torch.no_grad():
        z = model.vae.encode(torch.from_numpy(img * 2 - 1)[None]).latent_dist.mean
    if getattr(cfg, "shift_factor", None) is not None:
        z = z - cfg.shift_factor
    return (z * cfg.scaling_factor).numpy().astype(np.float32)


def example_noised_latent(model: LoadedModel, timestep: int, seed: int = 0) -> np.ndarray:
    """The clean example latent noised to ``timestep`` by the family's noise schedule (seeded noise)."""
    import torch

    from relaydiff.core.schedulers import build_scheduler

    x0 = torch.from_numpy(example_clean_latent(model))
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed))
    scheduler = build_scheduler("ddim", model.scheduler_config)
    return scheduler.add_noise(x0, noise, torch.tensor([timestep])).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------- components

_UNET_TOLERANCES = {"fp32": FP32, "fp16": FP16}


@register_component
@dataclass(frozen=True)
class UNetStep(Component):
    """The device UNet as one denoising step, classifier-free guidance computed inside the graph."""

    name: str = "unet_step"
    description: str = "device UNet, one denoising step with CFG inside: eps_u + g * (eps_c - eps_u)"
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("sample", "float32", (1, "C", "h", "w"), "the latent x_t, scaled for the timestep"),
        TensorSpec("timestep", "float32", (1,), "the timestep t (float, so every runtime takes it)"),
        TensorSpec("text_embeds", "float32", (2, "L", "D"), "text embeddings [uncond, cond]"),
        TensorSpec("guidance_scale", "float32", (1,), "classifier-free guidance scale g"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", (1, "C", "h", "w"), "guided noise prediction"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None  # CFG in the graph is ours: optimum's UNet config exports the bare UNet
    example_timestep: int = 501  # timestep of the example input (mid-trajectory, where a relay hands over)
    example_guidance: float = 5.0  # guidance scale of the example input (the relay's default)
    example_seed: int = 0  # seed of the example noise

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import UNetStep as Wrapper

        return Wrapper(model.unet).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {
            "sample": example_noised_latent(model, self.example_timestep, self.example_seed),
            "timestep": np.array([self.example_timestep], np.float32),
            "text_embeds": example_text_embeds(model),
            "guidance_scale": np.array([self.example_guidance], np.float32),
        }


@dataclass(frozen=True)
class UNetStepDistilled(Component):
    """``unet_step`` of a guidance-distilled student (relaydiff.core.student): one conditional pass, no CFG batch.

    Not registered: it is the form ``unet_step`` takes when the device model is a student
    (:func:`component_for`), so bundles, calibration and runtimes keep one component name for the step.
    """

    name: str = "unet_step"
    description: str = "device UNet of a guidance-distilled student, one denoising step: one conditional pass (guidance baked in)"
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("sample", "float32", (1, "C", "h", "w"), "the latent x_t at the student's jump timestep"),
        TensorSpec("timestep", "float32", (1,), "the timestep t (float, so every runtime takes it)"),
        TensorSpec("text_embeds", "float32", (1, "L", "D"), "conditional text embeddings"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", (1, "C", "h", "w"), "noise prediction, guidance distilled in"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None  # fixed batch-1 shapes and a float (1,) timestep: ours
    example_timestep: int = 641  # the first jump of the committed student (k = 8 of 25)
    example_seed: int = 0

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import UNetBatch as Wrapper  # the plain call, here on a batch of one

        return Wrapper(model.unet).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {
            "sample": example_noised_latent(model, self.example_timestep, self.example_seed),
            "timestep": np.array([self.example_timestep], np.float32),
            "text_embeds": example_text_embeds(model)[1:],
        }


UNET_STEP_DISTILLED = UNetStepDistilled()


def style_dims(model: LoadedModel) -> dict[str, int]:
    """:func:`family_dims` for an SDXL- or SD3-style model, whose text embeddings are not one encoder's: L and D of the
    per-token embeddings the network takes (SDXL: CLIP-L + OpenCLIP-G concatenated; SD3: CLIP joint with T5), P the
    pooled width (SDXL's pooled text embeddings, SD3's pooled projections), T the time-id count (SDXL)."""
    from relaydiff.core.relay import conditioning_widths, encode_conditioning, relay_side, image_size, RelayRequest

    d = family_dims(model)
    side = relay_side(model)
    cond, _ = encode_conditioning(model, "", "", image_size(side, RelayRequest("", 0, 1, sampler="euler")))
    widths = conditioning_widths(model)
    d.update(L=int(cond.text_embeds.shape[1]), D=int(cond.text_embeds.shape[2]))
    d["P"] = int(widths.get("pooled_projections", widths.get("pooled_text_embeds", 0)))
    if "time_ids" in widths:
        d["T"] = int(widths["time_ids"])
    return d


def example_conditioning(model: LoadedModel, prompt: str = EXAMPLE_PROMPT) -> dict[str, np.ndarray]:
    """[uncond, cond] rows of every conditioning field an SDXL/SD3-style model takes (diffusers' own encode_prompt),
    by the component input names: text_embeds, and pooled_text_embeds + time_ids (SDXL) or pooled_projections (SD3)."""
    from relaydiff.core.relay import encode_conditioning, image_size, relay_side, RelayRequest

    side = relay_side(model)
    cond, uncond = encode_conditioning(model, prompt, "", image_size(side, RelayRequest(prompt, 0, 1, sampler="euler")))
    out = {}
    for name in ("text_embeds", "pooled_text_embeds", "time_ids", "pooled_projections"):
        c, u = getattr(cond, name), getattr(uncond, name)
        if c is not None:
            out[name] = np.concatenate([u.numpy(), c.numpy()]).astype(np.float32)
    return out


def example_flow_latent(model: LoadedModel, sigma: float, seed: int = 0) -> np.ndarray:
    """The clean example latent on a rectified-flow path at ``sigma``: (1 - sigma) x0 + sigma noise (seeded)."""
    import torch

    x0 = torch.from_numpy(example_clean_latent(model))
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed))
    return ((1.0 - sigma) * x0 + sigma * noise).numpy().astype(np.float32)


@dataclass(frozen=True)
class SDXLUNetStep(Component):
    """``unet_step`` of an SDXL-style UNet: CFG inside, the added text-time conditioning as inputs.

    Not registered: it is the form ``unet_step`` takes for an SDXL-style model (:func:`component_for`).
    """

    name: str = "unet_step"
    description: str = ("device SDXL-style UNet, one denoising step with CFG inside: eps_u + g * (eps_c - eps_u); "
                        "pooled text embeddings and time ids as added conditioning")
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("sample", "float32", (1, "C", "h", "w"), "the latent x_t, scaled for the timestep"),
        TensorSpec("timestep", "float32", (1,), "the timestep t (float, so every runtime takes it)"),
        TensorSpec("text_embeds", "float32", (2, "L", "D"), "text embeddings [uncond, cond] (CLIP-L + OpenCLIP-G)"),
        TensorSpec("pooled_text_embeds", "float32", (2, "P"), "pooled text embeddings [uncond, cond] (OpenCLIP-G projection)"),
        TensorSpec("time_ids", "float32", (2, "T"), "size/crop time ids [uncond, cond]: (H, W, top, left, H, W)"),
        TensorSpec("guidance_scale", "float32", (1,), "classifier-free guidance scale g"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", (1, "C", "h", "w"), "guided noise prediction"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None
    example_timestep: int = 501
    example_guidance: float = 5.0
    example_seed: int = 0

    def dims(self, model: LoadedModel) -> dict[str, int]:
        return style_dims(model)

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import SDXLUNetStep as Wrapper

        return Wrapper(model.unet).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {
            "sample": example_noised_latent(model, self.example_timestep, self.example_seed),
            "timestep": np.array([self.example_timestep], np.float32),
            **example_conditioning(model),
            "guidance_scale": np.array([self.example_guidance], np.float32),
        }


@dataclass(frozen=True)
class SD3TransformerStep(Component):
    """``transformer_step``: one step of an SD3-style MMDiT, CFG inside, the pooled projections as an input.

    Not registered under its own name: it is the form the bundle's ``unet_step`` takes for an SD3-style model
    (:func:`component_for`), so manifests, bundle backends and the conformance suite keep one step name.
    """

    name: str = "unet_step"
    description: str = ("device SD3-style transformer (transformer_step), one flow step with CFG inside: "
                        "v_u + g * (v_c - v_u); joint text embeddings and pooled projections")
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("sample", "float32", (1, "C", "h", "w"), "the latent x_t (a flow model sees it unscaled)"),
        TensorSpec("timestep", "float32", (1,), "the flow-match timestep sigma x num_train_timesteps"),
        TensorSpec("text_embeds", "float32", (2, "L", "D"), "joint text embeddings [uncond, cond] (CLIP-L/G padded, T5)"),
        TensorSpec("pooled_projections", "float32", (2, "P"), "pooled projections [uncond, cond] (CLIP-L + CLIP-G)"),
        TensorSpec("guidance_scale", "float32", (1,), "classifier-free guidance scale g"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", (1, "C", "h", "w"), "guided flow velocity"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None
    example_sigma: float = 0.5  # mid-trajectory, where a relay hands over
    example_guidance: float = 5.0
    example_seed: int = 0

    def dims(self, model: LoadedModel) -> dict[str, int]:
        return style_dims(model)

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import SD3TransformerStep as Wrapper

        return Wrapper(model.unet).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        train = int(model.scheduler_config.get("num_train_timesteps", 1000))
        return {
            "sample": example_flow_latent(model, self.example_sigma, self.example_seed),
            "timestep": np.array([self.example_sigma * train], np.float32),
            **example_conditioning(model),
            "guidance_scale": np.array([self.example_guidance], np.float32),
        }


SDXL_UNET_STEP = SDXLUNetStep()
SD3_TRANSFORMER_STEP = SD3TransformerStep()


def component_for(name: str, model: LoadedModel) -> Component:
    """The component ``name`` in the form ``model`` needs: ``unet_step`` of a distilled student has no CFG batch; of an
    SDXL-style model it takes the text-time added conditioning; of an SD3-style model it is the transformer step.

    Raises:
        UnknownNameError: ``name`` is not registered (lists the known ones).
    """
    component = get_component(name)
    if name == "unet_step" and getattr(model, "student", None) is not None:
        return UNET_STEP_DISTILLED
    style = getattr(model, "style", "sd")
    if name == "unet_step" and style == "sd3":
        return SD3_TRANSFORMER_STEP
    if name == "unet_step" and style == "sdxl":
        return SDXL_UNET_STEP
    return component


@register_component
@dataclass(frozen=True)
class UNetBatch(Component):
    """The device UNet as the plain call on a batch of two (CFG as batch; guidance combined by the caller)."""

    name: str = "unet"
    description: str = "device UNet, plain call on a [uncond, cond] batch; the caller combines the guidance"
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("sample", "float32", ("B", "C", "h", "w"), "the latent x_t twice, scaled for the timestep"),
        TensorSpec("timestep", "float32", ("B",), "the timestep t per batch row"),
        TensorSpec("text_embeds", "float32", ("B", "L", "D"), "text embeddings [uncond, cond]"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", ("B", "C", "h", "w"), "noise prediction per batch row"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None  # optimum's UNet config has dynamic shapes and a scalar timestep
    example_timestep: int = 501  # timestep of the example input
    example_seed: int = 0  # seed of the example noise

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import UNetBatch as Wrapper

        return Wrapper(model.unet).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        x = example_noised_latent(model, self.example_timestep, self.example_seed)
        return {
            "sample": np.concatenate([x, x]),
            "timestep": np.array([self.example_timestep] * 2, np.float32),
            "text_embeds": example_text_embeds(model),
        }


def deep_feature_dims(model: LoadedModel, cache_branch: int) -> dict[str, int]:
    """"Dc", "Dh", "Dw": the shape of the deep features D a cache keeps at ``cache_branch`` (one pass on zeros, remembered)."""
    import torch

    from relaydiff.core.caching.split import SplitUNet

    key = (id(model.unet), cache_branch)
    if key not in _DEEP_DIMS:
        d = family_dims(model)
        with torch.no_grad():
            _, deep, _ = SplitUNet(model.unet, cache_branch).full(torch.zeros(2, d["C"], d["h"], d["w"]), torch.tensor([500.0]),
                                                                  torch.zeros(2, d["L"], d["D"]))
        _DEEP_DIMS[key] = {"Dc": int(deep.shape[1]), "Dh": int(deep.shape[2]), "Dw": int(deep.shape[3])}
    return _DEEP_DIMS[key]


_DEEP_DIMS: dict[tuple[int, int], dict[str, int]] = {}
_STEP_INPUTS = UNetStep().inputs


@register_component
@dataclass(frozen=True)
class UNetStepFull(Component):
    """``unet_step`` for feature caching (docs/cache.md): the guided noise prediction and the deep features D it computed."""

    name: str = "unet_step_full"
    description: str = "device UNet, one full step with CFG inside, returning the deep features of its [uncond, cond] batch"
    inputs: tuple[TensorSpec, ...] = _STEP_INPUTS
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", (1, "C", "h", "w"), "guided noise prediction"),
        TensorSpec("deep_features", "float32", (2, "Dc", "Dh", "Dw"), "deep features D of the [uncond, cond] rows (the cache)"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None  # a split UNet pass is ours
    cache_branch: int = 0  # the skip branch of the split (the family policy's)
    example_timestep: int = 501
    example_guidance: float = 5.0
    example_seed: int = 0

    def dims(self, model: LoadedModel) -> dict[str, int]:
        return {**family_dims(model), **deep_feature_dims(model, self.cache_branch)}

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import UNetStepFull as Wrapper

        return Wrapper(model.unet, self.cache_branch).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return UNetStep(example_timestep=self.example_timestep, example_guidance=self.example_guidance,
                        example_seed=self.example_seed).example_inputs(model)


@register_component
@dataclass(frozen=True)
class UNetStepCached(Component):
    """A cached ``unet_step``: the shallow branch on the latent with given deep features D (from an earlier full step)."""

    name: str = "unet_step_cached"
    description: str = "device UNet, one cached step with CFG inside: the shallow branch on the latent, the deep features given"
    inputs: tuple[TensorSpec, ...] = (
        *_STEP_INPUTS,
        TensorSpec("deep_features", "float32", (2, "Dc", "Dh", "Dw"), "deep features D of an earlier full step (reused or forecast)"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("noise_pred", "float32", (1, "C", "h", "w"), "guided noise prediction"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(_UNET_TOLERANCES))
    optimum: OptimumSource | None = None
    cache_branch: int = 0
    example_timestep: int = 501  # timestep of the cached step
    full_timestep: int = 541  # timestep of the earlier full step whose D the example reuses (one grid step of 25 before)
    example_guidance: float = 5.0
    example_seed: int = 0

    def dims(self, model: LoadedModel) -> dict[str, int]:
        return {**family_dims(model), **deep_feature_dims(model, self.cache_branch)}

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import UNetStepCached as Wrapper

        return Wrapper(model.unet, self.cache_branch).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        """The step's inputs plus a realistic D: the full step's deep features one grid step earlier on the same latent."""
        full = UNetStepFull(cache_branch=self.cache_branch, example_timestep=self.full_timestep,
                            example_guidance=self.example_guidance, example_seed=self.example_seed)
        step = UNetStep(example_timestep=self.example_timestep, example_guidance=self.example_guidance,
                        example_seed=self.example_seed).example_inputs(model)
        return {**step, "deep_features": full.reference(model, full.example_inputs(model))["deep_features"]}


CACHE_COMPONENTS = ("unet_step_full", "unet_step_cached")


@register_component
@dataclass(frozen=True)
class VaeDecoderComponent(Component):
    """The VAE decoder with the latent scaling/shift and the [-1, 1] -> [0, 1] post-processing baked in."""

    name: str = "vae_decoder"
    description: str = "VAE decoder: latent / scaling_factor (+ shift_factor) -> decode -> (x / 2 + 0.5).clamp(0, 1)"
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("latent", "float32", (1, "C", "h", "w"), "the final latent x_0, as the UNet sees it (scaled)"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("image", "float32", (1, 3, "H", "W"), "RGB image in [0, 1], channels first"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: {"fp32": FP32, "fp16": FP16})
    optimum: OptimumSource | None = None  # the scaling and post-processing are ours; optimum exports vae.decode only

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import VaeDecoder

        return VaeDecoder(model.vae).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {"latent": example_clean_latent(model)}


@register_component
@dataclass(frozen=True)
class TextEncoderComponent(Component):
    """The text encoder: token ids -> last hidden state (pooled output left out: the UNet does not use it)."""

    name: str = "text_encoder"
    description: str = "text encoder: input_ids -> last_hidden_state"
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("input_ids", "int32", (1, "L"), "token ids, padded to L (int32: CoreML has no int64 inputs)"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("last_hidden_state", "float32", (1, "L", "D"), "per-token embeddings for cross-attention"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: {"fp32": FP32, "fp16": FP16})
    optimum: OptimumSource | None = field(
        default_factory=lambda: OptimumSource(
            submodel="text_encoder", task="feature-extraction", library="diffusers",
            shapes={"batch_size": 1, "sequence_length": "L"},
        )
    )
    example_prompt: str = EXAMPLE_PROMPT  # the prompt tokenized for the example input

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import TextEncoder

        return TextEncoder(model.text_encoder).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        return {"input_ids": example_token_ids(model, self.example_prompt)}


SAFETY_FOLDERS = ("safety_checker", "feature_extractor")  # diffusers' StableDiffusionSafetyChecker layout in a pipeline folder
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def has_safety_checker(root: str | Path) -> bool:
    """Whether a family (pipeline) folder has a safety checker: ``safety_checker/config.json`` and the feature extractor's config."""
    r = Path(root)
    return (r / "safety_checker" / "config.json").is_file() and (r / "feature_extractor" / PREPROCESSOR_CONFIG).is_file()


def load_safety_checker(root: str | Path) -> Any:
    """The family's ``StableDiffusionSafetyChecker`` (safetensors weights only: nothing pickled), loaded once per folder.

    Raises:
        UnknownNameError: the folder has no safety checker.
    """
    key = str(Path(root).resolve())
    if key not in _CHECKERS:
        if not has_safety_checker(root):
            raise UnknownNameError(f"family '{root}' has no safety checker (expected {'/ and '.join(SAFETY_FOLDERS)}/ with "
                                   f"config.json and {PREPROCESSOR_CONFIG})")
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = StableDiffusionSafetyChecker.from_pretrained(str(Path(root) / "safety_checker"), use_safetensors=True,
                                                                local_files_only=True)
        _CHECKERS[key] = checker.eval().requires_grad_(False)
    return _CHECKERS[key]


_CHECKERS: dict[str, Any] = {}


def preprocessor_config(root: str | Path) -> dict[str, Any]:
    import json

    return dict(json.loads((Path(root) / "feature_extractor" / PREPROCESSOR_CONFIG).read_text()))


@register_component
@dataclass(frozen=True)
class SafetyCheckerComponent(Component):
    """The family's image safety checker (diffusers' StableDiffusionSafetyChecker): CLIP pixel values -> concept scores."""

    name: str = "safety_checker"
    description: str = ("safety checker (StableDiffusionSafetyChecker.forward_onnx as scores): clip_input -> concept and "
                        "special-care scores; flagged when any concept score > 0")
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("clip_input", "float32", (1, 3, "Sh", "Sw"), "CLIP pixel values of the image (feature_extractor's preprocessing)"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("concept_scores", "float32", (1, "Nc"), "cosine distance - threshold (+0.01 when a special-care score > 0)"),
        TensorSpec("special_scores", "float32", (1, "Ns"), "cosine distance - threshold of the special-care concepts"),
    )
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: {"fp32": FP32, "fp16": Tolerance(max_abs=1e-2)})
    optimum: OptimumSource | None = None  # the scores head is diffusers', not a model optimum exports

    def dims(self, model: LoadedModel) -> dict[str, int]:
        from relaydiff.runtime.safety import ClipPreprocess

        checker = load_safety_checker(model.ref.root)
        pre = ClipPreprocess.from_config(preprocessor_config(model.ref.root))
        return {**family_dims(model), "Sh": pre.crop[0], "Sw": pre.crop[1], "Nc": int(checker.concept_embeds.shape[0]),
                "Ns": int(checker.special_care_embeds.shape[0])}

    def module(self, model: LoadedModel) -> torch.nn.Module:
        from relaydiff.export.modules import SafetyScores

        return SafetyScores(load_safety_checker(model.ref.root)).eval()

    def example_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        from relaydiff.runtime.safety import clip_input

        d = family_dims(model)
        image = (example_picture(d["H"], d["W"]).transpose(1, 2, 0) * 255).round().astype(np.uint8)
        return {"clip_input": clip_input(image, preprocessor_config(model.ref.root))}


def all_components() -> dict[str, Component]:
    """Every registered component by name."""
    return {name: COMPONENTS.get(name) for name in COMPONENTS.names()}


def describe(name: str) -> dict[str, Any]:
    """A JSON-able description of a component's declaration (for docs and manifests)."""
    c = get_component(name)
    return {
        "name": c.name,
        "description": c.description,
        "inputs": [s.to_json() for s in c.inputs],
        "outputs": [s.to_json() for s in c.outputs],
        "tolerances": {k: v.to_json() for k, v in c.tolerances.items()},
    }
