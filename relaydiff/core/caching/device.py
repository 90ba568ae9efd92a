"""One budgeted device half: steps [k, N) where exactly B steps run the full UNet and the others reuse deep features.

A :class:`CachedStep` is the model side: ``full`` is one step's guided noise prediction plus the deep
features D it computed (:mod:`relaydiff.core.caching.split`), ``cached`` the prediction from the shallow
branch and a given D. A torch UNet (:class:`TorchCachedStep`) and a bundle's ``unet_step_full`` /
``unet_step_cached`` artifacts (``relaydiff.runtime.artifact_denoiser``) implement it, so the loop below
runs on both. The cache itself lives in the loop, not in the model: ``reuse`` keeps D of the last full
step, ``forecast`` extrapolates it from the last two (TaylorSeer, first order; see
:mod:`relaydiff.core.caching.denoiser`), so an exported graph only passes D in and out.

Which steps are full is fixed before the half starts (:func:`device_schedule`): the top B of the family's
learned policy (``<family>/cache_policy/<mechanism>.json``, trained by ``relaydiff cache train``), or the
uniform schedule when the family has no policy. The first device step is always full.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from relaydiff.core.caching.budget import check_budget, uniform_mask
from relaydiff.core.caching.denoiser import check_mechanism
from relaydiff.core.caching.split import SplitUNet
from relaydiff.core.denoiser import Conditioning
from relaydiff.core.errors import RelaydiffError

if TYPE_CHECKING:
    from relaydiff.core.caching.policy import PolicyConfig, SchedulePolicy
    from relaydiff.core.family import LoadedModel

log = logging.getLogger(__name__)

POLICY_FOLDER = "cache_policy"  # a family's committed policies: <family>/cache_policy/<mechanism>.json/.safetensors
DEFAULT_MECHANISM = "reuse"


@runtime_checkable
class CachedStep(Protocol):
    """A denoising step split for feature caching; ``latent`` is batch 1, already scaled for ``timestep``.

    With ``uncond`` the output is guided, eps_u + g (eps_c - eps_u) (Ho & Salimans 2022, eq. 6); without it,
    the conditional pass alone (no CFG, or a distilled student).
    """

    def full(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
             guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise prediction, deep features D of this step)."""
        ...

    def cached(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
               guidance_scale: float, deep: torch.Tensor) -> torch.Tensor:
        """The noise prediction from the shallow branch and the given deep features."""
        ...


class TorchCachedStep:
    """A diffusers UNet as a :class:`CachedStep` (CFG as a batch of two, as the relay loop runs it)."""

    def __init__(self, unet: Any, cache_branch: int = 0) -> None:
        """Raises RelaydiffError: a branch the UNet does not have (see :class:`SplitUNet`)."""
        self.split = SplitUNet(unet, cache_branch)

    def full(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
             guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        x, embeds = _batch(latent, cond, uncond)
        eps, deep, _probe = self.split.full(x, timestep, embeds)
        return _guide(eps, uncond is not None, guidance_scale), deep

    def cached(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
               guidance_scale: float, deep: torch.Tensor) -> torch.Tensor:
        x, embeds = _batch(latent, cond, uncond)
        eps = self.split.cached(self.split.shallow_down(x, timestep, embeds), deep, embeds)
        return _guide(eps, uncond is not None, guidance_scale)


def _batch(latent: torch.Tensor, cond: Conditioning, uncond: Conditioning | None) -> tuple[torch.Tensor, torch.Tensor]:
    if uncond is None:
        return latent, cond.text_embeds
    return torch.cat([latent, latent]), torch.cat([uncond.text_embeds, cond.text_embeds])


def _guide(eps: torch.Tensor, guided: bool, g: float) -> torch.Tensor:
    if not guided:
        return eps
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + g * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class DeviceCache:
    """What a device needs to honour a budget: its split step, the mechanism and the schedule policy (if any)."""

    step: CachedStep  # the model, split
    mechanism: str = DEFAULT_MECHANISM  # "reuse" or "forecast"
    policy: SchedulePolicy | None = None  # the learned schedule; None: uniform
    policy_config: PolicyConfig | None = None  # the policy's saved config (family id, training)
    source: str = "uniform"  # where the schedule comes from, for logs and reports: "uniform" or the policy file
    # schedules already computed, by (k, B, grid, scheduler config): fixed for a given policy, and computing one
    # (the policy's features and MLP) cost ~15 ms, about three full UNet steps of a bundle, per device half
    _schedules: dict[tuple[int, int, tuple[int, ...], str], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_mechanism(self.mechanism)
        if (self.policy is None) != (self.policy_config is None):
            raise RelaydiffError("a device cache needs both a policy and its config, or neither")
        if self.policy_config is not None and self.policy_config.mechanism != self.mechanism:
            raise RelaydiffError(f"cache policy {self.source!r} was trained for mechanism {self.policy_config.mechanism!r}, "
                                 f"not {self.mechanism!r}")


def family_policy_path(root: Path, mechanism: str = DEFAULT_MECHANISM) -> Path:
    """Where a family folder keeps its committed policy for ``mechanism`` (the JSON half)."""
    return Path(root) / POLICY_FOLDER / f"{check_mechanism(mechanism)}.json"


def torch_cache(model: LoadedModel, *, mechanism: str = DEFAULT_MECHANISM, policy_path: Path | None = None) -> DeviceCache:
    """The device cache of a loaded family model: its UNet split at the policy's branch, the family's policy.

    ``policy_path`` default: the family's committed policy (:func:`family_policy_path`); without one the
    schedule is uniform (logged). A policy trained for another family or UNet is refused.

    Raises:
        RelaydiffError: ``policy_path`` missing or unreadable, a policy of another family (naming both ids).
    """
    from relaydiff.core.caching.policy import check_policy_for, load_policy

    key = (mechanism, None if policy_path is None else str(policy_path))
    known = _CHECKED.setdefault(model.unet, {})
    if key not in known:  # the check hashes the UNet's weights file: once per loaded model, not once per request
        path = policy_path if policy_path is not None else family_policy_path(model.ref.root, mechanism)
        if policy_path is None and not path.is_file():
            log.info("family %s has no cache policy at %s: the budget is spent on the uniform schedule", model.family_id, path)
            known[key] = None
        else:
            policy, config = load_policy(path)
            check_policy_for(config, model, str(path))
            known[key] = (policy, config, str(path))
    checked = known[key]
    if checked is None:
        return DeviceCache(TorchCachedStep(model.unet), mechanism)
    policy, config, source = checked
    return DeviceCache(TorchCachedStep(model.unet, config.cache_branch), config.mechanism, policy, config, source)


# policies loaded and checked per loaded UNet (weak keys, and values that do not hold the UNet: freed with the model)
_CHECKED: weakref.WeakKeyDictionary[Any, dict[tuple[str, str | None], tuple[SchedulePolicy, PolicyConfig, str] | None]] = \
    weakref.WeakKeyDictionary()


def device_schedule(cache: DeviceCache, timesteps: torch.Tensor, k: int, budget: int,
                    scheduler_config: dict[str, Any]) -> torch.Tensor:
    """(N - k,) bool: which device steps run the full UNet under budget B (exactly B of them, the first included).

    Raises:
        RelaydiffError: B outside [1, N - k].
    """
    from relaydiff.core.caching.policy import learned_mask

    m = len(timesteps) - k
    check_budget(budget, m)
    if cache.policy is None:
        return uniform_mask(m, budget)
    key = (k, budget, tuple(int(t) for t in timesteps.tolist()), json.dumps(scheduler_config, sort_keys=True, default=repr))
    with cache._lock:
        mask = cache._schedules.get(key)
    if mask is None:
        mask = learned_mask(cache.policy, timesteps, k, budget, scheduler_config)
        with cache._lock:
            while len(cache._schedules) >= _MAX_SCHEDULES:  # grids and configs come from the wire: bounded, oldest dropped
                cache._schedules.pop(next(iter(cache._schedules)))
            cache._schedules[key] = mask
    return mask.clone()


_MAX_SCHEDULES = 1024  # per device cache; one per (k, B, grid, config) seen


StepHook = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, latents after the step)


def cached_steps(cache: DeviceCache, scheduler: Any, latents: torch.Tensor, embeds: tuple[torch.Tensor, torch.Tensor | None],
                 guidance_scale: float, timesteps: list[tuple[int, torch.Tensor]], full: torch.Tensor,
                 step_fn: Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor], *,
                 on_step: StepHook | None = None, scale: bool = True) -> torch.Tensor:
    """Run the given (grid index, timestep) steps with a cache: ``full[j]`` says whether step j is a full pass.

    ``step_fn(eps, i, t, x) -> x_next`` is the sampler's update (or a student's jump ``i``); ``scale``: call
    ``scheduler.scale_model_input`` first (a student's jumps take the latent as is).

    Raises:
        RelaydiffError: the first step is not full, or ``full`` does not have one flag per step.
    """
    if full.shape != (len(timesteps),) or (len(timesteps) and not bool(full[0])):
        raise RelaydiffError(f"a cached half needs one flag per step ({len(timesteps)}) and a full first step; got {full.tolist()}")
    cond = Conditioning(embeds[0])
    uncond = None if embeds[1] is None or guidance_scale <= 1.0 else Conditioning(embeds[1])
    last: torch.Tensor | None = None  # D of the last full step, and its step position
    prev: torch.Tensor | None = None  # D of the full step before it (forecast)
    last_j = prev_j = -1
    x = latents
    for j, (i, t) in enumerate(timesteps):
        inp = scheduler.scale_model_input(x, t) if scale else x  # step 1
        if bool(full[j]):
            eps, deep = cache.step.full(inp, t, cond, uncond, guidance_scale)  # steps 2-3, keeping D
            prev, prev_j, last, last_j = last, last_j, deep, j
        else:
            assert last is not None
            d = last
            if cache.mechanism == "forecast" and prev is not None:  # D(j) = D(s2) + (j - s2) (D(s2) - D(s1)) / (s2 - s1)
                d = last + (j - last_j) / (last_j - prev_j) * (last - prev)
            eps = cache.step.cached(inp, t, cond, uncond, guidance_scale, d)
        x = step_fn(eps, i, t, x)  # step 4
        if on_step is not None:
            on_step(i, int(t), x)
    return x
