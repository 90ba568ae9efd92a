"""The cached denoiser: given the step index and whether to recompute, it returns the noise prediction.

Two mechanisms fill a cached step's deep features D (see :mod:`relaydiff.core.caching.split`):

- ``reuse`` (DeepCache, Ma et al. 2024): D of the last full step, unchanged.
- ``forecast`` (TaylorSeer, Liu et al. 2025, first order): extrapolate D from the last two full steps s1 < s2
  by its finite difference in step index, ``D(i) = D(s2) + (i - s2) (D(s2) - D(s1)) / (s2 - s1)``; with one
  full step so far this is reuse.

Each row of a batch keeps its own cache, so several schedules run in one UNet batch: rows that recompute go
through the deep part together, the others take their cached D, and every row runs the shallow branch.
"""

from __future__ import annotations

from typing import Any

import torch

from relaydiff.core.caching.split import Shallow, SplitUNet
from relaydiff.core.errors import RelaydiffError

MECHANISMS = ("reuse", "forecast")


def check_mechanism(mechanism: str) -> str:
    """Return ``mechanism`` if known; raises RelaydiffError listing the known ones."""
    if mechanism not in MECHANISMS:
        raise RelaydiffError(f"unknown cache mechanism {mechanism!r}; expected one of: {', '.join(MECHANISMS)}")
    return mechanism


class CachedDenoiser:
    """A UNet with a per-row feature cache.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        mechanism: ``"reuse"`` or ``"forecast"``.
        cache_branch: the skip branch of the split (see :class:`relaydiff.core.caching.split.SplitUNet`).
    Raises:
        RelaydiffError: an unknown mechanism or a branch the UNet does not have.
    """

    def __init__(self, unet: Any, mechanism: str = "reuse", cache_branch: int = 0) -> None:
        self.split = SplitUNet(unet, cache_branch)
        self.mechanism = check_mechanism(mechanism)
        self.reset()

    def reset(self) -> None:
        """Forget every cached feature (a new trajectory starts)."""
        self._last: torch.Tensor | None = None  # D of each row's last full step
        self._prev: torch.Tensor | None = None  # D of the full step before that
        self._last_step: torch.Tensor | None = None  # (rows,) step index of _last; -1 = none
        self._prev_step: torch.Tensor | None = None

    def shallow(self, x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> Shallow:
        """The shallow down path of a step; its ``hidden`` is the probe."""
        return self.split.shallow_down(x, t, embeds)

    def finish(self, s: Shallow, embeds: torch.Tensor, *, step: int, recompute: bool | torch.Tensor) -> torch.Tensor:
        """The noise prediction of step ``step`` from its shallow path; rows with ``recompute`` run the deep part.

        Raises:
            RelaydiffError: a row is cached before it has had a full step.
        """
        rows = s.hidden.shape[0]
        full = torch.as_tensor(recompute, dtype=torch.bool).expand(rows) if not isinstance(recompute, torch.Tensor) else recompute.bool()
        if full.shape != (rows,):
            raise RelaydiffError(f"recompute must be one flag or one per batch row ({rows}), got shape {tuple(full.shape)}")
        if bool(full.all()):
            deep, skips = self.split.deep(s, embeds)
            self._store(torch.arange(rows), deep, step, rows)
            return self.split.shallow_up(Shallow(s.emb, s.hidden, skips, s.upsample_size), deep, embeds)
        if self._last is None or self._last_step is None or bool((self._last_step[~full] < 0).any()):
            raise RelaydiffError(f"step {step}: a cached step needs an earlier full step in the same trajectory")
        d = self._cached_features(step).clone()
        idx = full.nonzero().flatten()
        if idx.numel():
            sub = Shallow(s.emb[idx], s.hidden[idx], tuple(h[idx] for h in s.skips), s.upsample_size)
            deep_sub, _ = self.split.deep(sub, embeds[idx])
            d[idx] = deep_sub
            self._store(idx, deep_sub, step, rows)
        return self.split.cached(s, d, embeds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor, *, step: int,
                 recompute: bool | torch.Tensor) -> torch.Tensor:
        """Noise prediction of step ``step``: a full pass where ``recompute``, the cached deep features elsewhere."""
        return self.finish(self.shallow(x, t, embeds), embeds, step=step, recompute=recompute)

    # -- the cache ------------------------------------------------------------------------------------------
    def _cached_features(self, step: int) -> torch.Tensor:
        assert self._last is not None and self._last_step is not None
        if self.mechanism == "reuse" or self._prev is None:
            return self._last
        assert self._prev_step is not None
        has_two = self._prev_step >= 0
        gap = (self._last_step - self._prev_step).clamp(min=1).float()
        scale = torch.where(has_two, (step - self._last_step).float() / gap, torch.zeros_like(gap))
        scale = scale.view(-1, *([1] * (self._last.dim() - 1))).to(self._last.dtype)
        return self._last + scale * (self._last - self._prev)  # first-order Taylor step in the step index

    def _store(self, idx: torch.Tensor, deep: torch.Tensor, step: int, rows: int) -> None:
        if self._last is None or self._last.shape[0] != rows or self._last.shape[1:] != deep.shape[1:]:
            self._last = torch.zeros((rows, *deep.shape[1:]), dtype=deep.dtype)
            self._prev = torch.zeros_like(self._last)
            self._last_step = torch.full((rows,), -1, dtype=torch.long)
            self._prev_step = torch.full((rows,), -1, dtype=torch.long)
        assert self._prev is not None and self._last_step is not None and self._prev_step is not None
        if self.mechanism == "forecast":
            self._prev[idx] = self._last[idx]
            self._prev_step[idx] = self._last_step[idx]
        self._last[idx] = deep.detach()
        self._last_step[idx] = step
