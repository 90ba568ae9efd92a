"""Caching schedules under a budget B: which of the device's m = N - k steps run the full UNet.

Every schedule recomputes exactly B steps, the first device step always among them (there is nothing to
reuse before it):

- ``uniform``: steps floor(j m / B), j = 0..B-1 (DeepCache's fixed interval, generalised to any B);
- ``heuristic``: online, recompute when the probe (the shallow branch's output, computed on every step)
  has changed by more than a threshold delta relative to its value at the last full step; delta is solved
  per trajectory by bisection so that the rule alone spends B full steps, and the budget is then enforced
  exactly (no full step once B are spent; every remaining step full once the steps left equal the budget
  left). Solving delta costs extra trial trajectories: the heuristic is a quality baseline, not a fast path;
- ``learned``: the top B of a trained policy's per-step scores (:mod:`relaydiff.core.caching.policy`).
"""

from __future__ import annotations

import math

import torch

from relaydiff.cache.run import CachedHalf, Decide, cached_half, fixed
from relaydiff.core.caching.budget import budget_for, check_budget, uniform_mask  # noqa: F401  (the schedules' budget helpers)
from relaydiff.core.errors import RelaydiffError
from relaydiff.core.family import LoadedModel
from relaydiff.core.state import RelayState

SCHEDULES = ("uniform", "heuristic", "learned")


def threshold_rule(deltas: torch.Tensor, budgets: torch.Tensor, device_steps: int, *, enforce: bool) -> Decide:
    """The heuristic's decision: probe change > delta; with ``enforce``, exactly ``budgets`` full steps."""

    def decide(j: int, change: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        full = change > deltas
        if enforce:
            left = budgets - used
            full = torch.where(left >= device_steps - j, torch.ones_like(full), full)
            full = full & (left > 0)
        return full

    return decide


def heuristic_half(model: LoadedModel, state: RelayState, budgets: list[int], *, mechanism: str = "reuse",
                   cache_branch: int = 0, iterations: int = 14) -> tuple[CachedHalf, torch.Tensor]:
    """The error-heuristic schedule for each budget in ``budgets`` (one trajectory each, batched).

    delta is bisected in log space on [1e-4, 10] per trajectory until the unconstrained rule recomputes
    exactly B steps (or ``iterations`` are spent); the final run enforces B exactly. Returns the final
    trajectories and the deltas used.
    """
    m = state.num_inference_steps - state.step_index
    for b in budgets:
        check_budget(b, m)
    e = len(budgets)
    target = torch.tensor(budgets)
    lo, hi = torch.full((e,), math.log(1e-4)), torch.full((e,), math.log(10.0))
    best = torch.full((e,), math.log(1e-4))
    found = torch.zeros(e, dtype=torch.bool)
    for _ in range(iterations):
        mid = torch.where(found, best, (lo + hi) / 2)
        trial = cached_half(model, state, threshold_rule(mid.exp(), target, m, enforce=False), e,
                            mechanism=mechanism, cache_branch=cache_branch)
        count = trial.recomputed.sum(dim=1)
        hit = (count == target) & ~found
        best = torch.where(hit, mid, best)
        found |= hit
        too_many = count > target  # raise delta
        lo = torch.where(too_many & ~found, mid, lo)
        hi = torch.where(~too_many & ~found, mid, hi)
        best = torch.where(found, best, (lo + hi) / 2)
        if bool(found.all()):
            break
    deltas = best.exp()
    final = cached_half(model, state, threshold_rule(deltas, target, m, enforce=True), e, mechanism=mechanism,
                       cache_branch=cache_branch)
    return final, deltas


def fixed_half(model: LoadedModel, state: RelayState, masks: torch.Tensor, *, mechanism: str = "reuse",
               cache_branch: int = 0) -> CachedHalf:
    """Run (E, m) fixed schedules; each must start with a full step."""
    m = state.num_inference_steps - state.step_index
    if masks.dim() != 2 or masks.shape[1] != m:
        raise RelaydiffError(f"schedules must be (E, {m}) masks for N - k = {m} device steps, got {tuple(masks.shape)}")
    if not bool(masks[:, 0].all()):
        raise RelaydiffError("every schedule must recompute the first device step")
    return cached_half(model, state, fixed(masks.bool()), masks.shape[0], mechanism=mechanism, cache_branch=cache_branch)
