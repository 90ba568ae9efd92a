"""The samplers a relay supports, and how each one's hidden state travels with the latent.

diffusers schedulers keep mutable state between ``step`` calls (the step counter, the
multistep solver history). A relay moves a trajectory between processes mid-way, so for each
supported sampler this module names exactly which state must travel and how to restore it.
The step counter itself is not carried as a hidden value: the receiver calls the public
``set_begin_index(k)`` with the relay step, and the timestep grid is re-derived and checked.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
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
    flow: bool = False  # a rectified-flow sampler (SD3-style families, flow prediction); the others are for diffusion


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
        SamplerSpec(
            "flow_euler", "FlowMatchEulerDiscreteScheduler", (), False,
            "rectified-flow Euler (Esser et al. 2024), SD3's own sampler, deterministic", flow=True,
        ),
        SamplerSpec(
            "flow_euler_sde", "FlowMatchEulerDiscreteScheduler", (("stochastic_sampling", True),), True,
            "rectified-flow Euler with re-noising every step (diffusers' stochastic_sampling): the generator travels",
            flow=True,
        ),
        SamplerSpec(
            "flow_dpmpp_2m", "DPMSolverMultistepScheduler",
            (("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("use_flow_sigmas", True),
             ("prediction_type", "flow_prediction")),
            False,
            "DPM-Solver++(2M) on flow sigmas (diffusers' flow_prediction mode), multistep: carries its solver history",
            flow=True,
        ),
    )
}

# Keys of the noise schedule of a diffusion family: host and device must agree on these to share a trajectory.
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


# Keys of a rectified-flow family's schedule (FlowMatchEulerDiscreteScheduler's config), with their diffusers defaults.
FLOW_SCHEDULE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is a rectified-flow one: the flow-match class (named, or recognized by its
    ``shift`` and lack of a beta schedule once the class name is stripped), or a solver on flow sigmas."""
    return config.get("_class_name") == FLOW_CLASS or bool(config.get("use_flow_sigmas")) \
        or config.get("prediction_type") == "flow_prediction" or ("shift" in config and "beta_schedule" not in config)


def noise_schedule(config: Mapping[str, Any]) -> dict[str, Any]:
    """What host and device must agree on to share a trajectory, read from a family's (or a sampler's) config.

    A diffusion family: ``kind`` "diffusion" and the NOISE_SCHEDULE_KEYS (prediction type defaults to epsilon).
    A flow family: ``kind`` "flow", prediction "flow" and the FLOW_SCHEDULE_DEFAULTS keys; a DPM-Solver on flow
    sigmas names the shift ``flow_shift``, read here as ``shift``.
    """
    if is_flow_config(config):
        out: dict[str, Any] = {"kind": "flow", "prediction_type": "flow"}
        for key, default in FLOW_SCHEDULE_DEFAULTS.items():
            value = config.get(key, default)
            if key == "shift" and "shift" not in config:
                value = config.get("flow_shift", default)
            out[key] = float(value) if key in ("shift", "base_shift", "max_shift") and value is not None else value
        return out
    out = {"kind": "diffusion"}
    for key in NOISE_SCHEDULE_KEYS:
        value = config.get(key, "epsilon" if key == "prediction_type" else None)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def dynamic_shift_mu(config: Mapping[str, Any], image_seq_len: int) -> float | None:
    """The resolution-dependent shift ``mu`` of a flow family with ``use_dynamic_shifting`` (None without it):
    linear in the image's token count between (base_image_seq_len, base_shift) and (max_image_seq_len,
    max_shift), as diffusers' SD3 pipeline computes it (``calculate_shift``)."""
    if not config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    d = FLOW_SCHEDULE_DEFAULTS
    return float(calculate_shift(image_seq_len, config.get("base_image_seq_len", d["base_image_seq_len"]),
                                 config.get("max_image_seq_len", d["max_image_seq_len"]),
                                 config.get("base_shift", d["base_shift"]), config.get("max_shift", d["max_shift"])))


def fallback_sampler(config: Mapping[str, Any]) -> str:
    """The sampler to use when none is named and the folder's own is not relayable: ``flow_euler`` (SD3's own) on a rectified-flow family, else ``ddim``."""
    return "flow_euler" if is_flow_config(config) else "ddim"


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
    if spec.flow != is_flow_config(family_config):
        kind = "a rectified-flow" if is_flow_config(family_config) else "a diffusion"
        known = sorted(s.name for s in SAMPLERS.values() if s.flow == is_flow_config(family_config))
        raise RelaydiffError(f"sampler {name!r} cannot sample {kind} family; expected one of: {', '.join(known)}")
    if spec.flow and spec.class_name != FLOW_CLASS:  # a solver on flow sigmas: the family's shift is its flow_shift
        base = {"num_train_timesteps": base.get("num_train_timesteps", 1000),
                "flow_shift": float(base.get("shift", 1.0)),
                "use_dynamic_shifting": bool(base.get("use_dynamic_shifting", False))}
    base.update(dict(spec.overrides))
    return cls.from_config(base)


def set_steps(scheduler: Any, steps: int, mu: float | None = None) -> None:
    """Set ``scheduler``'s grid to exactly ``steps`` timesteps (one UNet call each), which the relay state
    carries and the receiver re-derives. PNDM's PLMS repeats one timestep to warm up (``n`` steps give n + 1
    timesteps), so it is asked for ``steps - 1``. ``mu``: a flow family's dynamic shift (see
    :func:`dynamic_shift_mu`), None for a fixed shift.

    Raises:
        RelaydiffError: PNDM with fewer than 2 steps; ``mu`` for a scheduler that takes none.
    """
    if type(scheduler).__name__ == "PNDMScheduler":
        if steps < 2:
            raise RelaydiffError(f"the pndm sampler needs at least 2 steps, got {steps}")
        scheduler.set_timesteps(steps - 1)
    elif mu is not None:
        import inspect

        if "mu" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise RelaydiffError(f"{type(scheduler).__name__} takes no dynamic shift (mu = {mu!r})")
        scheduler.set_timesteps(steps, mu=mu)
    else:
        scheduler.set_timesteps(steps)
    if len(scheduler.timesteps) != steps:
        raise RelaydiffError(f"{type(scheduler).__name__} gives {len(scheduler.timesteps)} timesteps for {steps} steps")


def step(scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
         generator: torch.Generator | None) -> torch.Tensor:
    """One sampler step; the generator goes only to samplers whose ``step`` takes one (PNDM's does not)."""
    if _takes_generator(type(scheduler)):
        return scheduler.step(model_output, timestep, sample, generator=generator).prev_sample
    return scheduler.step(model_output, timestep, sample).prev_sample


def _takes_generator(cls: Any) -> bool:
    """Whether ``cls.step`` takes a generator; asked once per class (``inspect.signature`` per step cost ~0.5 ms)."""
    known = _TAKES_GENERATOR.get(cls)
    if known is None:
        import inspect

        known = "generator" in inspect.signature(cls.step).parameters
        if len(_TAKES_GENERATOR) < 64:  # scheduler classes: a handful
            _TAKES_GENERATOR[cls] = known
    return known


_TAKES_GENERATOR: dict[Any, bool] = {}


_PROTOTYPES: OrderedDict[tuple[str, str, int, float | None], Any] = OrderedDict()  # fresh samplers by (name, config, N, mu)
_PROTOTYPES_MAX = 32  # a state's config comes from the wire: a bounded number of distinct ones is kept
_PROTOTYPES_LOCK = threading.Lock()


def restore_scheduler(name: str, config: dict[str, Any], steps: int, mu: float | None = None) -> Any:
    """The sampler a relay state was made with: its class on the state's config, on a ``steps``-long grid.

    Each call returns a new, unstepped scheduler: a deep copy of one built once per (sampler, config, N, mu)
    (``from_config`` + ``set_timesteps`` cost ~6 ms a device half; the copy ~0.5 ms). At most
    ``_PROTOTYPES_MAX`` such prototypes are kept (least recently used dropped).
    """
    key = (name, json.dumps(config, sort_keys=True, default=repr), int(steps), None if mu is None else float(mu))
    with _PROTOTYPES_LOCK:
        proto = _PROTOTYPES.get(key)
        if proto is not None:
            _PROTOTYPES.move_to_end(key)
    if proto is None:
        import diffusers

        proto = getattr(diffusers, sampler_spec(name).class_name).from_config(config)
        set_steps(proto, steps, mu)  # raises on a bad grid before anything is kept
        with _PROTOTYPES_LOCK:
            _PROTOTYPES[key] = proto
            while len(_PROTOTYPES) > _PROTOTYPES_MAX:
                _PROTOTYPES.popitem(last=False)
    return copy.deepcopy(proto)


def init_noise_sigma(scheduler: Any) -> Any:
    """The initial noise's scale: the scheduler's ``init_noise_sigma``; 1 for the flow-match schedulers (x_1 is
    pure unit noise; they define no such attribute)."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def scale_input(scheduler: Any, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
    """The model input for ``timestep``: the scheduler's ``scale_model_input``, or the sample itself for the
    flow-match schedulers, which have none (a flow model sees x_t unscaled)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, timestep)


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
