"""A device budget B: how many of the device's m = N - k steps run the full UNet, and the uniform schedule of it."""

from __future__ import annotations

import math

import torch

from relaydiff.core.errors import RelaydiffError


def check_budget(budget: int, device_steps: int) -> int:
    """Return ``budget`` if it lies in [1, N - k]; raises RelaydiffError with the value and the range."""
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= device_steps:
        raise RelaydiffError(
            f"cache budget {budget!r} is outside [1, {device_steps}]: the device runs N - k = {device_steps} steps "
            "and the first one is always a full pass"
        )
    return budget


def budget_for(fraction: float, device_steps: int) -> int:
    """The budget B for a fraction of the device steps: round(fraction m), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise RelaydiffError(f"budget fraction {fraction!r} must lie in (0, 1]")
    return max(1, min(device_steps, round(fraction * device_steps)))


def uniform_mask(device_steps: int, budget: int) -> torch.Tensor:
    """(m,) bool: B full steps at floor(j m / B) (DeepCache's fixed interval, generalised to any B)."""
    check_budget(budget, device_steps)
    mask = torch.zeros(device_steps, dtype=torch.bool)
    mask[[math.floor(j * device_steps / budget) for j in range(budget)]] = True
    return mask
