"""Img2img refinement (SDEdit, Meng et al. 2022): re-noise a clean latent to strength s, run the rest of the schedule.

Strength s in (0, 1] is the fraction of the N-step schedule that is run again. The steps are:

1. build the sampler's N-step grid; the tail to run is its last m = max(1, round(s * N)) UNet calls
   (diffusers' img2img ``get_timesteps`` rule, rounded instead of truncated so no strength in (0, 1]
   gives zero steps), starting at grid index k = N - m;
2. draw the noise eps ~ N(0, I) from ``seed`` exactly as generation from noise does;
3. x_k = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at t = timesteps[k] (``scheduler.add_noise``; the
   sigma form x_0 + sigma_t eps for Euler) -- except at s = 1, where x_k = eps * init_noise_sigma
   (the latent is discarded, as diffusers' inpainting pipeline does at full strength), so refining at
   s = 1 is generating from the same noise, bit for bit;
4. run steps [k, N) with the ordinary relay loop (:func:`relaydiff.core.relay.denoise`), the multistep
   samplers starting with an empty history (their first step is first order, as at step 0).

PNDM's PLMS grid repeats its second timestep (a Heun-like warm-up: ``[u0, u1, u1, u2, ...]``), and the
warm-up only works on that repeat. Starting it mid-grid, as diffusers' img2img does, would skip one
step's noise level; here its tail is rebuilt as ``[u_j, u_j+1, u_j+1, u_j+2, ...]`` over the N - 1
distinct timesteps instead, so a PNDM refinement is a PNDM run from t = u_j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelaySide, StepCallback, denoise
from relaydiff.core.schedulers import build_scheduler, sampler_spec, set_steps


def check_strength(strength: Any) -> float:
    """``strength`` as a float; raises RelaydiffError quoting it unless it is a finite number in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0.0 < float(strength) <= 1.0:
        raise RelaydiffError(f"strength {strength!r} is outside (0, 1]; expected a number in (0, 1]")
    return float(strength)


@dataclass(frozen=True)
class RefinePlan:
    """Where a refinement enters the schedule and what it runs."""

    strength: float  # the requested strength in (0, 1]
    steps: int  # N of the full schedule
    start_index: int  # k: the grid index of the first step run (0 at strength 1)
    timesteps: torch.Tensor  # the timesteps the loop walks, one UNet call (CFG batch) each
    noise_timestep: int  # the timestep x_0 is re-noised to

    @property
    def calls(self) -> int:
        """Denoiser calls the refinement makes (a CFG call runs a batch of two)."""
        return int(self.timesteps.numel())


def plan(scheduler: Any, steps: int, strength: float) -> RefinePlan:
    """The tail of ``scheduler``'s ``steps``-long grid (already set) that a refinement at ``strength`` runs."""
    s = check_strength(strength)
    grid = scheduler.timesteps
    if type(scheduler).__name__ == "PNDMScheduler":
        distinct = torch.cat([grid[:1], grid[2:]])  # drop the warm-up repeat: N - 1 distinct timesteps
        n = int(distinct.numel())
        m = min(n, max(1, round(s * n)))
        j = n - m
        if j == 0:
            return RefinePlan(s, steps, 0, grid, int(grid[0]))
        tail = distinct[j:]
        walk = tail if m == 1 else torch.cat([tail[:2], tail[1:]])  # [u_j, u_j+1, u_j+1, ...]: the warm-up
        return RefinePlan(s, steps, j + 1, walk, int(tail[0]))
    m = min(steps, max(1, round(s * steps)))
    k = steps - m
    return RefinePlan(s, steps, k, grid[k:], int(grid[k]))


@dataclass
class Refined:
    """What a refinement produced."""

    latents: torch.Tensor  # the final latent (B, C, h, w)
    plan: RefinePlan  # where it entered the schedule and how many calls it made


@torch.no_grad()
def refine(
    side: RelaySide,
    latent: torch.Tensor | None,
    embeds: tuple[torch.Tensor, torch.Tensor | None],
    *,
    strength: float,
    steps: int,
    sampler: str = "ddim",
    guidance_scale: float = 5.0,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> Refined:
    """Refine ``latent`` (a clean x_0 in ``side``'s latent space) at ``strength`` with ``side``'s denoiser.

    Args:
        side: the model that refines (the host's large model, or the device's for a reused preview).
        latent: the x_0 to start from; None only at strength 1 (then ``shape`` gives the latent shape).
        embeds: (cond, uncond) text embeddings, each (1, L, D); uncond None disables CFG.
        strength: in (0, 1]; 1 is generation from the noise of ``seed``.
        steps: N of the full schedule; the refinement runs about ``strength * N`` of them.
        sampler: any of :data:`relaydiff.core.schedulers.SAMPLERS`.
        guidance_scale, seed: as in :class:`relaydiff.core.relay.RelayRequest`.

    Raises:
        RelaydiffError: a strength outside (0, 1], a latent that does not match the side's latent
            channels or is not finite, a missing latent below strength 1, or a distilled student side.
    """
    from diffusers.utils.torch_utils import randn_tensor

    s = check_strength(strength)
    if side.student is not None:
        raise RelaydiffError("a distilled student runs its own fixed jumps; refine with a UNet side")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RelaydiffError(f"steps must be a positive integer, got {steps!r}")
    sampler_spec(sampler)
    spec = side.denoiser.latent_spec
    if latent is None:
        if s < 1.0:
            raise RelaydiffError(f"strength {s} < 1 refines a latent; none was given")
        if shape is None:
            shape = (1, spec.channels, *spec.sample_size)
    else:
        if latent.ndim != 4 or latent.shape[1] != spec.channels:
            raise RelaydiffError(
                f"latent has shape {tuple(latent.shape)}; expected (B, {spec.channels}, h, w) for this model")
        if not torch.isfinite(latent).all():
            raise RelaydiffError("latent holds NaN or Inf values")
        shape = tuple(latent.shape)
    scheduler = build_scheduler(sampler, dict(side.scheduler_config))  # step 1
    set_steps(scheduler, steps)
    where = plan(scheduler, steps, s)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = randn_tensor(shape, generator=generator, dtype=torch.float32)  # step 2
    if where.start_index == 0:  # step 3, full strength: the noise itself, as generation starts
        x = noise * scheduler.init_noise_sigma
    else:
        assert latent is not None
        if hasattr(scheduler, "set_begin_index") and type(scheduler).__name__ != "PNDMScheduler":
            scheduler.set_begin_index(where.start_index)
        x = scheduler.add_noise(latent.float(), noise, torch.tensor([where.noise_timestep]))
    walk = None if where.start_index == 0 or type(scheduler).__name__ != "PNDMScheduler" else where.timesteps
    begin, end = (0, where.calls) if walk is not None else (where.start_index, steps)
    out = denoise(side.denoiser, scheduler, x, embeds, guidance_scale, begin, end, generator,  # step 4
                  on_step=on_step, progress=progress, desc="refine", timesteps=walk)
    return Refined(out, where)
