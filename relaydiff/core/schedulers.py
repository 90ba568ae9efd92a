"""The samplers a relay supports, and how each one's hidden state travels with the latent.

diffusers schedulers keep mutable state between ``step`` calls (the step counter, the
multistep solver history). A relay moves a trajectory between processes mid-way, so for each
supported sampler this module names exactly which state must travel and how to restore it.
The step counter itself is not carried as a hidden value: the receiver calls the public
``set_begin_index(k)`` with the relay step, and the timestep grid is re-derived and checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from relaydiff.core.errors import RelaydiffError


@dataclass(frozen=True)
class SamplerSpec:
    """One supported sampler: a diffusers scheduler class plus the config overrides that define it."""

    name: str  # our short name, e.g. "dpmpp_2m"
    class_name: str  # diffusers scheduler class
    overrides: tuple[tuple[str, Any], ...]  # config fields forced on top of the family's noise schedule
    stochastic: bool  # draws noise inside step(): the generator state must travel too
    description: str


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("ddim", "DDIMScheduler", (), False, "DDIM (Song et al. 2021), deterministic"),
        SamplerSpec("euler", "EulerDiscreteScheduler", (), False, "Euler (Karras et al. 2022), deterministic"),
        SamplerSpec(
            "euler_a", "EulerAncestralDiscreteScheduler", (), True, "Euler ancestral, draws noise every step"
        ),
        SamplerSpec(
            "dpmpp_2m",
            "DPMSolverMultistepScheduler",
            (("algorithm_type", "dpmsolver++"), ("solver_order", 2)),
            False,
            "DPM-Solver++(2M) (Lu et al. 2022), multistep: carries its solver history",
        ),
        SamplerSpec(
            "dpmpp_2m_sde",
            "DPMSolverMultistepScheduler",
            (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)),
            True,
            "DPM-Solver++(2M) SDE: multistep history and per-step noise",
        ),
    )
}

# Keys of the noise schedule: host and device must agree on these to share a trajectory.
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def sampler_spec(name: str) -> SamplerSpec:
    """Return the spec of sampler ``name``; raises RelaydiffError listing the known names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise RelaydiffError(
            f"unknown scheduler {name!r}; expected one of: {', '.join(sorted(SAMPLERS))}"
        ) from None


def build_scheduler(name: str, family_config: dict[str, Any]) -> Any:
    """Build sampler ``name`` on the family's noise schedule (its ``scheduler/`` config)."""
    import diffusers

    spec = sampler_spec(name)
    cls = getattr(diffusers, spec.class_name)
    base = {k: v for k, v in family_config.items() if not k.startswith("_")}
    base.update(dict(spec.overrides))
    return cls.from_config(base)


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """The scheduler's full config as plain JSON-able values (no private keys)."""
    return {k: _jsonable(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def export_history(scheduler: Any) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The solver history a multistep scheduler needs to continue: (tensors, integers).

    DPM-Solver++ keeps its last ``solver_order`` converted model outputs and how many
    lower-order warm-up steps it has taken; single-step samplers keep nothing.
    """
    tensors: dict[str, torch.Tensor] = {}
    ints: dict[str, int] = {}
    if hasattr(scheduler, "model_outputs") and hasattr(scheduler, "lower_order_nums"):
        for i, out in enumerate(scheduler.model_outputs):
            if out is not None:
                tensors[f"model_outputs.{i}"] = out.detach().clone().contiguous()
        ints["solver_order"] = len(scheduler.model_outputs)
        ints["lower_order_nums"] = int(scheduler.lower_order_nums)
    return tensors, ints


def import_history(scheduler: Any, tensors: dict[str, torch.Tensor], ints: dict[str, int]) -> None:
    """Restore what :func:`export_history` captured into a freshly built scheduler."""
    if hasattr(scheduler, "model_outputs") and hasattr(scheduler, "lower_order_nums"):
        order = len(scheduler.model_outputs)
        if ints.get("solver_order", order) != order:
            raise RelaydiffError(
                f"relay state solver history has order {ints.get('solver_order')!r}; "
                f"the scheduler expects {order}"
            )
        scheduler.model_outputs = [tensors.get(f"model_outputs.{i}") for i in range(order)]
        scheduler.lower_order_nums = int(ints.get("lower_order_nums", 0))
    elif tensors or ints:
        raise RelaydiffError(
            f"relay state carries solver history {sorted(tensors) + sorted(ints)} "
            f"but {type(scheduler).__name__} keeps none"
        )
