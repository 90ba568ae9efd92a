"""The device half of a relay with feature caching: steps [k, N) where only some steps run the full UNet.

The loop is the relay's (:func:`relaydiff.core.relay.denoise`: scale, one CFG batch [uncond, cond], guidance,
sampler step) with the UNet call replaced by :class:`relaydiff.core.caching.denoiser.CachedDenoiser`. Several
schedules of one hand-off state run as one batch (E trajectories, 2E UNet rows with CFG); each keeps its own
cache. Which steps recompute is a :data:`Decide` callback, so fixed schedules and the online error heuristic
share the loop. Only deterministic samplers are batched this way (a stochastic sampler's noise would differ
with the batch size), so stochastic ones are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from relaydiff.core.caching.denoiser import CachedDenoiser
from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.family import LoadedModel, check_state
from relaydiff.core.schedulers import import_history, sampler_spec
from relaydiff.core.state import RelayState

# (device step j, relative probe change since each trajectory's last full step (E,), full steps used (E,)) -> (E,) bool
Decide = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CachedHalf:
    """E cached device halves of one hand-off."""

    latents: torch.Tensor  # (E, C, h, w) final latents
    recomputed: torch.Tensor  # (E, N - k) bool: which device steps ran the full UNet
    probe_change: torch.Tensor  # (E, N - k) relative change of the probe vs the last full step (0 at full steps' own reference)


def fixed(masks: torch.Tensor) -> Decide:
    """A Decide that follows precomputed (E, N - k) masks."""
    return lambda j, _change, _used: masks[:, j]


def _scheduler_for(state: RelayState) -> Any:  # a diffusers scheduler (Any, as in relaydiff.core.schedulers)
    """A fresh scheduler positioned at the state's step (as :func:`relaydiff.core.relay.resume` builds it)."""
    import diffusers

    spec = sampler_spec(state.sampler)
    if spec.stochastic:
        raise RelaydiffError(f"cached device halves need a deterministic sampler; {state.sampler!r} draws noise every step")
    scheduler = getattr(diffusers, spec.class_name).from_config(state.scheduler_config)
    scheduler.set_timesteps(state.num_inference_steps)
    if not torch.equal(scheduler.timesteps.to(state.timesteps.dtype), state.timesteps):
        raise RelayStateError("the timestep grid in the relay state differs from the one its scheduler config gives")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(state.step_index)
    import_history(scheduler, dict(state.history), dict(state.history_ints))
    return scheduler


@torch.no_grad()
def cached_half(model: LoadedModel, state: RelayState, decide: Decide, copies: int, *, mechanism: str = "reuse",
                cache_branch: int = 0) -> CachedHalf:
    """Run ``copies`` cached device halves of ``state``, choosing full steps with ``decide``.

    The first device step is always full (there is nothing to reuse yet), whatever ``decide`` says.

    Raises:
        RelaydiffError: a student device model, a stochastic sampler, a bad mechanism or branch.
    """
    if getattr(model, "student", None) is not None:
        raise RelaydiffError("feature caching runs the undistilled device UNet; this device model is a distilled student")
    check_state(model, state)
    scheduler = _scheduler_for(state)
    den = CachedDenoiser(model.unet, mechanism, cache_branch)
    k, n = state.step_index, state.num_inference_steps
    e = copies
    latents = state.latents.float().repeat(e, 1, 1, 1)
    cond = state.prompt_embeds.float()
    uncond = state.negative_prompt_embeds
    cfg = state.guidance_scale > 1.0 and uncond is not None
    embeds = cond.repeat(e, 1, 1)
    if cfg and uncond is not None:
        embeds = torch.cat([uncond.float().repeat(e, 1, 1), embeds])
    recomputed = torch.zeros((e, n - k), dtype=torch.bool)
    change = torch.zeros((e, n - k))
    probe_ref: torch.Tensor | None = None  # (E, ...) probe of each trajectory's last full step
    used = torch.zeros(e, dtype=torch.long)
    for j, i in enumerate(range(k, n)):
        t = scheduler.timesteps[i]
        x = torch.cat([latents, latents]) if cfg else latents
        x = scheduler.scale_model_input(x, t)  # step 1
        s = den.shallow(x, t, embeds)
        probe = s.hidden.view(2, e, -1).transpose(0, 1).reshape(e, -1) if cfg else s.hidden.reshape(e, -1)
        if probe_ref is None:
            full = torch.ones(e, dtype=torch.bool)
        else:
            change[:, j] = (probe - probe_ref).norm(dim=1) / probe_ref.norm(dim=1).clamp(min=1e-12)
            full = decide(j, change[:, j], used).bool()
        recomputed[:, j] = full
        used += full.long()
        probe_ref = probe.clone() if probe_ref is None else torch.where(full[:, None], probe, probe_ref)
        eps = den.finish(s, embeds, step=i, recompute=torch.cat([full, full]) if cfg else full)  # step 2
        if cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + state.guidance_scale * (eps_cond - eps_uncond)  # step 3
        latents = scheduler.step(eps, t, latents).prev_sample  # step 4
    return CachedHalf(latents, recomputed, change)
