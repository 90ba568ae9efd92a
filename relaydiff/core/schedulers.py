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
        SamplerSpec(
            "pndm",
            "PNDMScheduler",
            (("skip_prk_steps", True),),
            False,
            "PNDM/PLMS (Liu et al. 2022), the SD-1.5 folders' scheduler: carries its last model outputs and counter",
        ),
        SamplerSpec(
            "unipc",
            "UniPCMultistepScheduler",
            (),
            False,
            "UniPC (Zhao et al. 2023), multistep predictor-corrector: carries its history and last sample",
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


def set_steps(scheduler: Any, steps: int) -> None:
    """Set ``scheduler``'s grid to exactly ``steps`` timesteps (one UNet call each), which the relay state
    carries and the receiver re-derives. PNDM's PLMS repeats one timestep to warm up (``n`` steps give n + 1
    timesteps), so it is asked for ``steps - 1``.

    Raises:
        RelaydiffError: PNDM with fewer than 2 steps.
    """
    if type(scheduler).__name__ == "PNDMScheduler":
        if steps < 2:
            raise RelaydiffError(f"the pndm sampler needs at least 2 steps, got {steps}")
        scheduler.set_timesteps(steps - 1)
    else:
        scheduler.set_timesteps(steps)
    if len(scheduler.timesteps) != steps:
        raise RelaydiffError(f"{type(scheduler).__name__} gives {len(scheduler.timesteps)} timesteps for {steps} steps")


def step(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
         generator: torch.Generator | None) -> torch.Tensor:
    """One sampler step; the generator goes only to samplers whose ``step`` takes one (PNDM's does not)."""
    import inspect

    if "generator" in inspect.signature(scheduler.step).parameters:
        return scheduler.step(model_output, timestep, sample, generator=generator).prev_sample
    return scheduler.step(model_output, timestep, sample).prev_sample


def restore_scheduler(name: str, config: dict[str, Any], steps: int) -> Any:
    """The sampler a relay state was made with: its class on the state's config, on a ``steps``-long grid."""
    import diffusers

    scheduler = getattr(diffusers, sampler_spec(name).class_name).from_config(config)
    set_steps(scheduler, steps)
    return scheduler


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

    - DPM-Solver++ keeps its last ``solver_order`` converted model outputs and how many lower-order
      warm-up steps it has taken;
    - UniPC keeps the same, plus the sample its corrector needs (``last_sample``), the order of the last
      predictor step (``this_order``) and the timesteps of its outputs;
    - PNDM (PLMS) keeps its last (up to 4) model outputs (``ets``), its step counter (the warm-up steps
      differ) and the sample of its first warm-up step (``cur_sample``);
    - single-step samplers keep nothing.
    """
    tensors: dict[str, torch.Tensor] = {}
    ints: dict[str, int] = {}
    if hasattr(scheduler, "ets") and hasattr(scheduler, "counter"):  # PNDM
        for i, out in enumerate(scheduler.ets):
            tensors[f"ets.{i}"] = out.detach().clone().contiguous()
        ints["ets"] = len(scheduler.ets)
        ints["counter"] = int(scheduler.counter)
        if isinstance(scheduler.cur_sample, torch.Tensor):
            tensors["cur_sample"] = scheduler.cur_sample.detach().clone().contiguous()
        if isinstance(scheduler.cur_model_output, torch.Tensor):  # PRK steps only (skip_prk_steps=False)
            tensors["cur_model_output"] = scheduler.cur_model_output.detach().clone().contiguous()
    elif hasattr(scheduler, "model_outputs") and hasattr(scheduler, "lower_order_nums"):
        for i, out in enumerate(scheduler.model_outputs):
            if out is not None:
                tensors[f"model_outputs.{i}"] = out.detach().clone().contiguous()
        ints["solver_order"] = len(scheduler.model_outputs)
        ints["lower_order_nums"] = int(scheduler.lower_order_nums)
        if hasattr(scheduler, "last_sample"):  # UniPC
            if isinstance(scheduler.last_sample, torch.Tensor):
                tensors["last_sample"] = scheduler.last_sample.detach().clone().contiguous()
            if getattr(scheduler, "this_order", None) is not None:
                ints["this_order"] = int(scheduler.this_order)
            for i, t in enumerate(scheduler.timestep_list):
                if t is not None:
                    ints[f"timestep_list.{i}"] = int(t)
    return tensors, ints


def _need(store: dict[str, Any], key: str, what: str) -> Any:
    if key not in store:
        raise RelaydiffError(f"relay state for {what} lacks solver history {key!r}")
    return store[key]


def import_history(scheduler: Any, tensors: dict[str, torch.Tensor], ints: dict[str, int]) -> None:
    """Restore what :func:`export_history` captured into a freshly built scheduler (after its grid is set)."""
    name = type(scheduler).__name__
    if hasattr(scheduler, "ets") and hasattr(scheduler, "counter"):  # PNDM
        n = int(ints.get("ets", 0))
        if not 0 <= n <= 4:
            raise RelaydiffError(f"relay state carries {n} PNDM model outputs; expected 0 to 4")
        scheduler.ets = [_need(tensors, f"ets.{i}", name) for i in range(n)]
        scheduler.counter = int(ints.get("counter", 0))
        scheduler.cur_sample = tensors.get("cur_sample")
        scheduler.cur_model_output = tensors.get("cur_model_output", 0)
    elif hasattr(scheduler, "model_outputs") and hasattr(scheduler, "lower_order_nums"):
        order = len(scheduler.model_outputs)
        if ints.get("solver_order", order) != order:
            raise RelaydiffError(
                f"relay state solver history has order {ints.get('solver_order')!r}; "
                f"the scheduler expects {order}"
            )
        scheduler.model_outputs = [tensors.get(f"model_outputs.{i}") for i in range(order)]
        scheduler.lower_order_nums = int(ints.get("lower_order_nums", 0))
        if hasattr(scheduler, "last_sample"):  # UniPC
            scheduler.last_sample = tensors.get("last_sample")
            if "this_order" in ints:
                scheduler.this_order = int(ints["this_order"])
            dtype = scheduler.timesteps.dtype
            scheduler.timestep_list = [
                torch.tensor(ints[f"timestep_list.{i}"], dtype=dtype) if f"timestep_list.{i}" in ints else None
                for i in range(order)
            ]
    elif tensors or ints:
        raise RelaydiffError(
            f"relay state carries solver history {sorted(tensors) + sorted(ints)} "
            f"but {name} keeps none"
        )
