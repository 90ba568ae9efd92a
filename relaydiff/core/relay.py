"""The relay: the host runs denoising steps [0, k) and returns a RelayState; the device resumes [k, N) and decodes.

We write the denoising loop ourselves rather than call ``StableDiffusionPipeline.__call__``,
because the pipeline cannot stop after step k and export, or start from, a mid-trajectory state.
Each step is the standard one (Ho et al. 2020, with the scheduler's update rule):

1. scale the model input for timestep t (``scheduler.scale_model_input``; a flow model sees x_t as is);
2. predict noise (or, for a rectified-flow model, the velocity) for the conditional and, with CFG, the
   unconditional conditioning in one batch;
3. combine: eps = eps_uncond + g * (eps_cond - eps_uncond) (Ho & Salimans 2022, eq. 6);
4. take the sampler's update x_t -> x_{t-1} (``scheduler.step``).

The conditioning is a :class:`~relaydiff.core.denoiser.Conditioning`: SD 1.x/2.x per-token embeddings;
SDXL adds pooled embeddings and size/crop time ids; SD3 joint embeddings and pooled projections.

The model is used only through :class:`relaydiff.core.denoiser.Denoiser`; a :class:`RelaySide` is what
the loop needs of one side (its denoiser, noise schedule, family id, VAE factor and, for a distilled
student, its spec), so a torch family model and a bundle's artifacts run the same loop. A
:class:`~relaydiff.core.denoiser.GuidedDenoiser` does steps 2-3 itself in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from relaydiff.core.denoiser import Conditioning, Denoiser, GuidedDenoiser, denoiser_of
from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.family import LoadedModel, check_state
from relaydiff.core.schedulers import (
    build_scheduler,
    dynamic_shift_mu,
    export_history,
    import_history,
    init_noise_sigma,
    noise_schedule,
    restore_scheduler,
    scale_input,
    sampler_spec,
    scheduler_config,
    set_steps,
)
from relaydiff.core.schedulers import step as sampler_step
from relaydiff.core.state import RelayState

if TYPE_CHECKING:
    from relaydiff.core.caching.device import DeviceCache
    from relaydiff.core.student import StudentSpec

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, latents after the step)
TextEncoder = Callable[[torch.Tensor], torch.Tensor]  # token ids (1, L) -> per-token embeddings (1, L, D)


@dataclass(frozen=True)
class RelaySide:
    """What the relay loop needs of one side of a relay: no tokenizer, VAE or torch module, only the denoiser and facts."""

    denoiser: Denoiser  # the model the loop calls once (or, with CFG on a plain denoiser, on a batch of two) per step
    scheduler_config: Mapping[str, Any]  # the family's scheduler config: the noise schedule and timestep-grid settings
    family_id: str  # the latent space the side belongs to (RelayState.family_id)
    vae_scale_factor: int  # image pixels per latent pixel
    student: StudentSpec | None = None  # a distilled student's jumps (its denoiser takes one conditional pass each)
    cache: DeviceCache | None = None  # feature caching for a state with a cache budget (None: built from a torch model, else refused)
    conditioning_widths: Mapping[str, int] = field(default_factory=dict)  # added Conditioning fields the denoiser
    #   needs, with their widths: SDXL {"pooled_text_embeds": P, "time_ids": 6}, SD3 {"pooled_projections": P}


def relay_side(model: LoadedModel) -> RelaySide:
    """A loaded family model as the loop sees it: its network as a Denoiser, plus its schedule, family id and student."""
    return RelaySide(denoiser_of(model), model.scheduler_config, model.family_id, model.vae_scale_factor, model.student,
                     conditioning_widths=conditioning_widths(model))


def conditioning_widths(model: LoadedModel) -> dict[str, int]:
    """The added conditioning a loaded model's network takes: SDXL's pooled embeddings (the CLIP-G projection
    width) and time ids (their count, from the UNet's added-embedding input), SD3's pooled projections."""
    net = model.unet.config
    if model.style == "sd3":
        return {"pooled_projections": int(net.pooled_projection_dim)}
    if getattr(net, "addition_embed_type", None) == "text_time":
        pooled = int(model.text_encoder_2.config.projection_dim)
        return {"pooled_text_embeds": pooled,
                "time_ids": (int(net.projection_class_embeddings_input_dim) - pooled) // int(net.addition_time_embed_dim)}
    return {}


def _side(model: LoadedModel | RelaySide) -> RelaySide:
    return model if isinstance(model, RelaySide) else relay_side(model)


@dataclass(frozen=True)
class RelayRequest:
    """One text-to-image request and where to split it."""

    prompt: str  # the text prompt
    relay_step: int  # k: the host runs steps [0, k), the device [k, steps); 0 = device-only, steps = host-only
    steps: int = 25  # N: number of denoising steps in the whole trajectory
    sampler: str = "ddim"  # see relaydiff.core.schedulers.SAMPLERS
    guidance_scale: float = 5.0  # classifier-free guidance; <= 1 disables CFG
    seed: int = 0  # seed of the initial noise (and of a stochastic sampler's noise)
    negative_prompt: str = ""  # the unconditional prompt for CFG
    height: int | None = None  # image height in pixels; default: the UNet's sample size x VAE factor
    width: int | None = None  # image width in pixels
    cache_budget: int | None = None  # B: full UNet passes the device may spend on its steps [k, N); None: every step full

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise RelaydiffError(f"steps must be a positive integer, got {self.steps!r}")
        if isinstance(self.relay_step, bool) or not isinstance(self.relay_step, int) or not 0 <= self.relay_step <= self.steps:
            raise RelaydiffError(f"relay step {self.relay_step!r} is outside [0, {self.steps}] (steps = {self.steps})")
        sampler_spec(self.sampler)
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise RelaydiffError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise RelaydiffError(f"{name} must be a positive integer, got {v!r}")
        if self.cache_budget is not None:
            m = self.steps - self.relay_step
            b = self.cache_budget
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= m:
                raise RelaydiffError(f"cache budget {b!r} is outside [1, {m}]: the device runs N - k = {self.steps} - "
                                     f"{self.relay_step} = {m} steps and spends at least its first full pass")


@dataclass
class RelayResult:
    """What a whole relay produced, with its costs."""

    images: np.ndarray  # (B, H, W, 3) uint8
    latents: torch.Tensor  # final latent before decoding
    host_seconds: float  # host compute: prompt encoding + steps [0, k)
    device_seconds: float  # device compute: steps [k, N) + VAE decode
    state_bytes: int  # size of the serialized relay state handed over
    norms: list[float] = field(default_factory=list)  # ||x_t||_2 after each step (the latent diagnostic)
    handoff: bytes = b""  # the serialized relay state that crossed from host to device


def _cfg(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


@torch.no_grad()
def encode_prompt(model: LoadedModel, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings (cond, uncond), each (1, L, D), from the model's own tokenizer and text encoder."""
    return encode_texts(model.tokenizer, lambda ids: model.text_encoder(ids)[0], prompt, negative_prompt)


@torch.no_grad()
def encode_conditioning(model: LoadedModel, prompt: str, negative_prompt: str = "",
                        size: tuple[int, int] | None = None) -> tuple[Conditioning, Conditioning]:
    """The (cond, uncond) conditioning of a prompt for the model's style, batch 1, float32.

    SD 1.x/2.x: the text encoder's last hidden states. SDXL and SD3: diffusers' own pipeline
    ``encode_prompt`` on the model's encoders (their layer choices, concatenation, padding and the pooled
    outputs are the pipeline's, so the embeddings are diffusers'); SDXL's time ids are (H, W, 0, 0, H, W):
    original size, crop top-left, target size (Podell et al. 2023, sec. 2.2), for the ``size`` = (H, W) image.
    """
    if model.style == "sd":
        cond, uncond = encode_prompt(model, prompt, negative_prompt)
        return Conditioning(cond), Conditioning(uncond)
    pipe = _encoding_pipeline(model)
    if model.style == "sdxl":
        if size is None:
            raise RelaydiffError("SDXL time ids need the image size")
        # no negative prompt is None, as in the pipeline: SDXL's force_zeros_for_empty_prompt then makes zeros
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=negative_prompt or None)
        h, w = size
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        return (Conditioning(pe, pooled_text_embeds=pooled, time_ids=ids).float(),
                Conditioning(npe, pooled_text_embeds=npooled, time_ids=ids.clone()).float())
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt, None, None, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=negative_prompt,
                                                  max_sequence_length=int(model.tokenizer_3.model_max_length))
    return Conditioning(pe, pooled_projections=pooled).float(), Conditioning(npe, pooled_projections=npooled).float()


def _encoding_pipeline(model: LoadedModel) -> Any:
    """The diffusers pipeline of the model's style over its own modules (no copies), used for its ``encode_prompt``."""
    import diffusers

    scheduler = getattr(diffusers, "FlowMatchEulerDiscreteScheduler" if model.style == "sd3" else "EulerDiscreteScheduler")()
    common = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                  text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2, scheduler=scheduler)
    if model.style == "sd3":
        return diffusers.StableDiffusion3Pipeline(transformer=model.unet, text_encoder_3=model.text_encoder_3,
                                                  tokenizer_3=model.tokenizer_3, **common)
    zeros = bool((model.pipeline_config or {}).get("force_zeros_for_empty_prompt", True))
    return diffusers.StableDiffusionXLPipeline(unet=model.unet, force_zeros_for_empty_prompt=zeros, **common)


def image_size(side: RelaySide, req: RelayRequest) -> tuple[int, int]:
    """The request's image (H, W) in pixels: its own, else the network's sample size times the VAE factor."""
    f, spec = side.vae_scale_factor, side.denoiser.latent_spec
    return req.height or spec.sample_size[0] * f, req.width or spec.sample_size[1] * f


@torch.no_grad()
def encode_texts(tokenizer: Any, encoder: TextEncoder, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings (cond, uncond), each (1, L, D): ``tokenizer`` pads to its max length, ``encoder`` embeds the ids."""
    out = []
    for text in (prompt, negative_prompt):
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        out.append(encoder(ids.input_ids).float())
    return out[0], out[1]


def _latent_shape(side: RelaySide, req: RelayRequest) -> tuple[int, int, int, int]:
    f = side.vae_scale_factor
    spec = side.denoiser.latent_spec
    h, w = image_size(side, req)
    if h % f or w % f:
        raise RelaydiffError(f"image size {h}x{w} must be a multiple of the VAE factor {f}")
    return (1, spec.channels, h // f, w // f)


@torch.no_grad()
def denoise(
    denoiser: Denoiser,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: tuple[Conditioning | torch.Tensor, Conditioning | torch.Tensor | None],
    guidance_scale: float,
    start: int,
    end: int,
    generator: torch.Generator | None,
    *,
    on_step: StepCallback | None = None,
    progress: bool = False,
    desc: str = "denoise",
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run steps [start, end) of ``timesteps`` (default ``scheduler.timesteps``) with ``denoiser``; ``conditioning`` =
    (cond, uncond or None), each a Conditioning (or bare per-token text embeddings).

    ``timesteps`` is for a grid the scheduler's own does not hold, e.g. a PNDM img2img tail with its
    warm-up step (relaydiff.core.refine).
    """
    from tqdm.auto import tqdm

    grid = scheduler.timesteps if timesteps is None else timesteps

    cond, uncond = (None if c is None else c if isinstance(c, Conditioning) else Conditioning(c) for c in conditioning)
    assert cond is not None
    guided = uncond is not None and _cfg(guidance_scale)
    both = Conditioning.cat([uncond, cond]) if guided and uncond is not None else cond
    for i in tqdm(range(start, end), desc=desc, disable=not progress or end <= start, leave=False):
        t = grid[i]
        if guided and uncond is not None and isinstance(denoiser, GuidedDenoiser):  # steps 2-3 in one call
            eps = denoiser.guided(scale_input(scheduler, latents, t), t, cond, uncond, guidance_scale)  # step 1
        else:
            x = torch.cat([latents, latents]) if guided else latents
            x = scale_input(scheduler, x, t)  # step 1
            eps = denoiser(x, t, both)  # step 2
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # step 3
        latents = sampler_step(scheduler, eps, t, latents, generator)  # step 4
        if on_step is not None:
            on_step(i, int(t), latents)
    return latents


def start(
    model: LoadedModel,
    req: RelayRequest,
    *,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> RelayState:
    """Host half: encode the prompt, draw the initial noise, run steps [0, k), return the relay state."""
    state, _ = next(iter(snapshots(model, req, [req.relay_step], on_step=on_step, progress=progress).values()))
    return state


def snapshots(
    model: LoadedModel,
    req: RelayRequest,
    at: list[int] | tuple[int, ...],
    *,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> dict[int, tuple[RelayState, float]]:
    """Run one host trajectory up to max(at) and return the relay state at each step k in ``at``.

    Also returns the host compute seconds spent to reach each k (prompt encoding included),
    so that evaluating many relay steps costs one host trajectory instead of one per k.
    """
    side = relay_side(model)
    return _snapshots(side, req, at, lambda: encode_conditioning(model, req.prompt, req.negative_prompt, image_size(side, req)),
                      on_step=on_step, progress=progress)


def start_from(
    side: RelaySide,
    req: RelayRequest,
    embeds: tuple[torch.Tensor, torch.Tensor] | tuple[Conditioning, Conditioning],
    *,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> RelayState:
    """:func:`start` with the prompt already encoded (``embeds`` = (cond, uncond): Conditionings, or per-token
    embeddings (1, L, D) each), for a side without a text encoder."""
    conds = tuple(e if isinstance(e, Conditioning) else Conditioning(e) for e in embeds)
    state, _ = _snapshots(side, req, [req.relay_step], lambda: (conds[0], conds[1]), on_step=on_step,
                          progress=progress)[req.relay_step]
    return state


def _snapshots(
    side: RelaySide,
    req: RelayRequest,
    at: list[int] | tuple[int, ...],
    encode: Callable[[], tuple[Conditioning, Conditioning]],
    *,
    on_step: StepCallback | None,
    progress: bool,
) -> dict[int, tuple[RelayState, float]]:
    ks = sorted(set(at))
    for k in ks:
        if not 0 <= k <= req.steps:
            raise RelaydiffError(f"relay step {k!r} is outside [0, {req.steps}]")
    t0 = time.perf_counter()
    scheduler = build_scheduler(req.sampler, dict(side.scheduler_config))
    mu = _mu(side, req)
    set_steps(scheduler, req.steps, mu)
    cond, uncond = encode()
    generator = torch.Generator("cpu").manual_seed(req.seed)
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(_latent_shape(side, req), generator=generator, dtype=torch.float32)
    latents = latents * init_noise_sigma(scheduler)
    out: dict[int, tuple[RelayState, float]] = {}
    done = 0
    for k in ks:
        latents = denoise(
            side.denoiser, scheduler, latents, (cond, uncond), req.guidance_scale, done, k, generator,
            on_step=on_step, progress=progress, desc="host steps",
        )
        done = k
        elapsed = time.perf_counter() - t0
        out[k] = (_make_state(side, req, scheduler, latents, k, cond, uncond, generator, mu), elapsed)
    return out


def _mu(side: RelaySide, req: RelayRequest) -> float | None:
    """A dynamically shifted flow family's mu for the request's image: from its token count (latent / patch)."""
    _, _, h, w = _latent_shape(side, req)
    patch = side.denoiser.latent_spec.patch_size
    return dynamic_shift_mu(side.scheduler_config, (h // patch) * (w // patch))


@torch.no_grad()
def start_batch(
    model: LoadedModel,
    requests: list[RelayRequest] | tuple[RelayRequest, ...],
    *,
    on_step: Sequence[StepCallback | None] | None = None,
    on_ready: Callable[[int, RelayState, float], None] | None = None,
) -> list[tuple[RelayState, float] | Exception]:
    """Host half of several requests at once: one UNet call per step for every request still running.

    The requests must share the step count, sampler and latent size (so they share the timestep
    grid); prompts, seeds, guidance scales and relay steps may differ. Each request keeps its own
    scheduler and generator, so its state is the one :func:`start` returns, up to float rounding of
    the batched UNet (tests bound the difference). Returns ``(state, seconds)`` per request in
    order, where seconds is the wall time until that request's state was ready.

    ``on_step`` holds one :data:`StepCallback` (or None) per request, called after each of that request's
    steps, as :func:`start` calls its own. A callback that raises drops its request from the batch
    between two steps (the host stops computing it; the others go on unchanged) and the exception it
    raised takes the request's place in the returned list.

    ``on_ready(j, state, seconds)`` is called as soon as request ``j``'s state is ready, before the
    batch runs its remaining steps, so that a caller can hand it over while the longer requests go on.

    We batch by hand because diffusers pipelines batch prompts but cannot stop requests at
    different steps or export a mid-trajectory state.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if not requests:
        return []
    side = relay_side(model)
    first = requests[0]
    for r in requests[1:]:
        if (r.steps, r.sampler, _latent_shape(side, r)) != (first.steps, first.sampler, _latent_shape(side, first)):
            raise RelaydiffError(
                "batched host requests must share steps, sampler and size; got "
                f"{(r.steps, r.sampler, r.height, r.width)!r} and {(first.steps, first.sampler, first.height, first.width)!r}"
            )
    n = len(requests)
    if on_step is not None and len(on_step) != n:
        raise RelaydiffError(f"on_step must hold one callback per request ({n}), got {len(on_step)}")
    callbacks = list(on_step) if on_step is not None else [None] * n
    t0 = time.perf_counter()
    schedulers, generators, conds, unconds, latents = [], [], [], [], []
    for r in requests:
        sch = build_scheduler(r.sampler, model.scheduler_config)
        set_steps(sch, r.steps, _mu(side, r))
        cond, uncond = encode_conditioning(model, r.prompt, r.negative_prompt, image_size(side, r))
        gen = torch.Generator("cpu").manual_seed(r.seed)
        lat = randn_tensor(_latent_shape(side, r), generator=gen, dtype=torch.float32) * init_noise_sigma(sch)
        schedulers.append(sch)
        generators.append(gen)
        conds.append(cond)
        unconds.append(uncond)
        latents.append(lat)
    out: list[tuple[RelayState, float] | Exception | None] = [None] * n

    def finish(j: int) -> None:
        r = requests[j]
        state = _make_state(side, r, schedulers[j], latents[j], r.relay_step, conds[j], unconds[j], generators[j],
                            _mu(side, r))
        seconds = time.perf_counter() - t0
        out[j] = (state, seconds)
        if on_ready is not None:
            on_ready(j, state, seconds)

    for j, r in enumerate(requests):
        if r.relay_step == 0:
            finish(j)
    for i in range(max(r.relay_step for r in requests)):
        active = [j for j, r in enumerate(requests) if r.relay_step > i and out[j] is None]
        if not active:
            break
        t = schedulers[active[0]].timesteps[i]
        xs, embeds, sizes = [], [], []
        for j in active:  # 1. per-request input scaling; 2. one batch: [uncond, cond] for CFG requests
            x = scale_input(schedulers[j], latents[j], t)
            if _cfg(requests[j].guidance_scale):
                xs += [x, x]
                embeds += [unconds[j], conds[j]]
                sizes.append(2)
            else:
                xs.append(x)
                embeds.append(conds[j])
                sizes.append(1)
        eps_all = side.denoiser(torch.cat(xs), t, Conditioning.cat(embeds))
        offset = 0
        for j, size in zip(active, sizes):
            eps = eps_all[offset : offset + size]
            offset += size
            if size == 2:  # 3. guidance, per request
                eps = eps[:1] + requests[j].guidance_scale * (eps[1:] - eps[:1])
            latents[j] = sampler_step(schedulers[j], eps, t, latents[j], generators[j])  # 4.
            callback = callbacks[j]
            if callback is not None:
                try:
                    callback(i, int(t), latents[j])
                except Exception as exc:  # the request leaves the batch; the others go on
                    out[j] = exc
                    continue
            if requests[j].relay_step == i + 1:
                finish(j)
    return [o for o in out if o is not None]


def _make_state(
    side: RelaySide,
    req: RelayRequest,
    scheduler: Any,
    latents: torch.Tensor,
    k: int,
    cond: Conditioning,
    uncond: Conditioning,
    generator: torch.Generator,
    mu: float | None = None,
) -> RelayState:
    hist, hist_ints = export_history(scheduler)
    sigmas = getattr(scheduler, "sigmas", None)
    cfg = _cfg(req.guidance_scale)
    extras = {}
    for name in ("pooled_text_embeds", "time_ids", "pooled_projections"):
        extras[name] = getattr(cond, name)
        extras[f"negative_{name}"] = getattr(uncond, name) if cfg else None
    return RelayState(
        latents=latents.contiguous(),
        step_index=k,
        timesteps=scheduler.timesteps.clone(),
        sampler=req.sampler,
        scheduler_config=scheduler_config(scheduler),
        guidance_scale=float(req.guidance_scale),
        prompt_embeds=cond.text_embeds,
        negative_prompt_embeds=uncond.text_embeds if cfg else None,
        history=hist,
        history_ints=hist_ints,
        sigmas=sigmas.clone().float() if isinstance(sigmas, torch.Tensor) else None,
        generator_state=generator.get_state() if sampler_spec(req.sampler).stochastic else None,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        seed=req.seed,
        family_id=side.family_id,
        cache_budget=req.cache_budget if k == req.relay_step else None,
        noise_schedule=noise_schedule(side.scheduler_config),
        mu=mu,
        **extras,
    )


SHAPE_FIELDS = ("latent.channels", "text_embeds.width", "pooled_text_embeds.width", "time_ids.width",
                "pooled_projections.width")  # mismatches of shape alone (same family and schedule): a malformed state


def state_mismatches(model: LoadedModel | RelaySide, state: RelayState) -> list[tuple[str, Any, Any]]:
    """Every reason ``model`` cannot continue ``state``, as ``(field, state's value, device's value)``: family id,
    each noise-schedule key (kind, prediction, shift, ...), latent channels, text-embedding width and the width of
    each added conditioning (None where one side has none)."""
    side = _side(model)
    found: list[tuple[str, Any, Any]] = []
    if state.family_id != side.family_id:
        found.append(("family_id", state.family_id, side.family_id))
    mine = noise_schedule(side.scheduler_config)
    theirs = state.noise_schedule
    found += [(f"scheduler.{key}", theirs.get(key), mine.get(key)) for key in sorted({**mine, **theirs})
              if theirs.get(key) != mine.get(key)]
    channels = side.denoiser.latent_spec.channels
    if int(state.latents.shape[1]) != channels:
        found.append(("latent.channels", int(state.latents.shape[1]), channels))
    dim = side.denoiser.text_embed_dim
    if int(state.prompt_embeds.shape[-1]) != dim:
        found.append(("text_embeds.width", int(state.prompt_embeds.shape[-1]), dim))
    for name in ("pooled_text_embeds", "time_ids", "pooled_projections"):
        value, want = getattr(state, name), side.conditioning_widths.get(name)
        have = None if value is None else int(value.shape[-1])
        if have != want:
            found.append((f"{name}.width", have, want))
    return found
def resume(
    model: LoadedModel | RelaySide,
    state: RelayState,
    *,
    end: int | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> RelayState:
    """Device half: rebuild the sampler from the state, run steps [k, end) (default: to N), return the new state.

    ``model`` is a loaded family model, or any :class:`RelaySide` (e.g. a bundle's artifact denoiser). ``state``
    must be validated already (``RelayState.from_bytes`` does it; the relay loop's own states need not be): this
    runs the compatibility check (:func:`relaydiff.core.family.check_state`), not the validation.
    """
    side = _side(model)
    check_state(side, state)
    n = state.num_inference_steps
    end = n if end is None else end
    if not state.step_index <= end <= n:
        raise RelaydiffError(f"end step {end!r} is outside [{state.step_index}, {n}]")
    scheduler = restore_scheduler(state.sampler, state.scheduler_config, n, state.mu)
    if not torch.equal(scheduler.timesteps.to(state.timesteps.dtype), state.timesteps):
        raise RelayStateError(
            f"the timestep grid in the relay state {state.timesteps.tolist()} differs from the one its "
            f"scheduler config gives for {n} steps {scheduler.timesteps.tolist()}"
        )
    if sampler_spec(state.sampler).flow and (state.sigmas is None or not torch.equal(scheduler.sigmas.float(), state.sigmas.float())):
        raise RelayStateError(  # the flow step moves x by (sigma_next - sigma) * v: the sigmas are the trajectory
            f"the flow sigmas in the relay state differ from the ones its scheduler config gives for {n} steps")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(state.step_index)
    import_history(scheduler, dict(state.history), dict(state.history_ints))
    generator = None
    if state.generator_state is not None:
        generator = torch.Generator("cpu")
        generator.set_state(state.generator_state)
    cache = _device_cache(model, side, state, end) if state.cache_budget is not None else None
    if side.student is not None:  # a distilled student: its own coarse jumps, guidance baked in
        if end != n:
            raise RelaydiffError(f"a distilled student finishes the whole trajectory; end must be {n}, got {end}")
        from relaydiff.core.student import student_finish

        latents = student_finish(side.denoiser, side.student, state.latents, state.timesteps, state.step_index,
                                 state.prompt_embeds.float(), state.scheduler_config, state.sampler,
                                 cache=cache, budget=state.cache_budget)
    elif cache is not None and state.cache_budget is not None:  # B full passes, the others from cached deep features
        from relaydiff.core.caching.device import cached_steps, device_schedule

        full = device_schedule(cache, state.timesteps, state.step_index, state.cache_budget, state.scheduler_config)
        latents = cached_steps(
            cache, scheduler, state.latents.float(), (state.prompt_embeds.float(), _opt_float(state.negative_prompt_embeds)),
            state.guidance_scale, [(i, scheduler.timesteps[i]) for i in range(state.step_index, n)], full,
            lambda eps, _i, t, x: sampler_step(scheduler, eps, t, x, generator), on_step=on_step,
        )
    else:
        latents = denoise(
            side.denoiser, scheduler, state.latents.float(), (state.conditioning(), state.negative_conditioning()),
            state.guidance_scale, state.step_index, end, generator, on_step=on_step, progress=progress, desc="device steps",
        )
    hist, hist_ints = export_history(scheduler)
    sigmas = getattr(scheduler, "sigmas", None)
    return RelayState(
        latents=latents.contiguous(),
        step_index=end,
        timesteps=state.timesteps,
        sampler=state.sampler,
        scheduler_config=state.scheduler_config,
        guidance_scale=state.guidance_scale,
        prompt_embeds=state.prompt_embeds,
        negative_prompt_embeds=state.negative_prompt_embeds,
        history=hist,
        history_ints=hist_ints,
        sigmas=sigmas.clone().float() if isinstance(sigmas, torch.Tensor) else state.sigmas,
        generator_state=generator.get_state() if generator is not None else None,
        prompt=state.prompt,
        negative_prompt=state.negative_prompt,
        seed=state.seed,
        family_id=state.family_id,
        noise_schedule=state.noise_schedule,
        mu=state.mu,
        **{k: getattr(state, k) for n in ("pooled_text_embeds", "time_ids", "pooled_projections")
           for k in (n, f"negative_{n}")},
    )


def _device_cache(model: LoadedModel | RelaySide, side: RelaySide, state: RelayState, end: int) -> DeviceCache:
    """The cache that spends ``state.cache_budget``: the side's own, else one built from a torch family model.

    A student caches across its own jumps with the uniform schedule (the family's learned policy is trained on
    the undistilled device UNet's grid); an undistilled torch model uses the family's committed policy.

    Raises:
        RelaydiffError: a partial device half, or a side (e.g. a bundle without cached-step artifacts) that cannot cache.
    """
    from relaydiff.core.caching.device import DeviceCache, TorchCachedStep, torch_cache

    if end != state.num_inference_steps:
        raise RelaydiffError(f"a device half with a cache budget finishes the trajectory; end must be {state.num_inference_steps}, got {end}")
    if side.cache is not None:
        return side.cache
    if isinstance(model, LoadedModel):
        return DeviceCache(TorchCachedStep(model.unet)) if model.student is not None else torch_cache(model)
    raise RelaydiffError(f"this device cannot honour cache budget {state.cache_budget}: its denoiser "
                         f"({type(side.denoiser).__name__}) has no cached step (a bundle needs unet_step_full and unet_step_cached)")


def _opt_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


@torch.no_grad()
def decode(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Decode latents with the model's VAE to (B, H, W, 3) uint8 images."""
    cfg = model.vae.config
    z = latents / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None) is not None:
        z = z + cfg.shift_factor
    image = model.vae.decode(z).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def relay(
    host: LoadedModel,
    device: LoadedModel,
    req: RelayRequest,
    *,
    progress: bool = False,
) -> RelayResult:
    """Run a whole relay in one process, passing the state through its byte form as a link would.

    k = 0 is device-only (the device encodes the prompt itself); k = N is host-only (the device
    only decodes).
    """
    norms: list[float] = []

    def record(_i: int, _t: int, x: torch.Tensor) -> None:
        norms.append(float(x.float().norm()))

    t0 = time.perf_counter()
    first = host if req.relay_step > 0 else device
    state = start(first, req, on_step=record, progress=progress)
    t1 = time.perf_counter()
    payload = state.to_bytes()
    received = RelayState.from_bytes(payload)
    t2 = time.perf_counter()
    final = resume(device, received, on_step=record, progress=progress)
    images = decode(device, final.latents)
    t3 = time.perf_counter()
    host_s = t1 - t0 if req.relay_step > 0 else 0.0
    device_s = (t3 - t2) + (t1 - t0 if req.relay_step == 0 else 0.0)
    return RelayResult(images, final.latents, host_s, device_s, len(payload), norms, payload)
