"""The relay state: everything a device needs to resume a trajectory the host started.

Serialized as a safetensors buffer (raw little-endian tensors with dtype and shape, plus one
JSON metadata entry): no pickle, no eval, bounded size, checked on load. Nothing is hidden:
the latent, the relay step, the whole timestep grid, the sampler and its config, the
multistep solver history, guidance, text embeddings and, for stochastic samplers, the
generator state all travel explicitly.

A state is parsed and validated **once per hop, by the layer that consumes it**: :meth:`RelayState.from_bytes`
(the device runtime, ``relaydiff resume``, the in-process relay) or :func:`validate` for an in-memory state
(the host's fallback). Building a ``RelayState`` checks nothing: the relay loop that builds one is trusted,
and whoever receives its bytes checks them. The link carries the bytes and never looks inside.

Version 2 (docs/protocol.md section 5.1) adds what SDXL- and SD3-style families are conditioned
on (pooled text embeddings, size/crop time ids, pooled projections, each with its unconditional
twin for CFG) and the family's noise schedule (diffusion, or rectified flow with its ``shift``
and, with dynamic shifting, ``mu``). Version 1 states are refused, not guessed at.
A device budget (``cache_budget``: how many full UNet passes the device may spend, docs/cache.md) is an
optional metadata entry, written only when set: a state without one runs every device step full.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from relaydiff.core.errors import RelaydiffError, RelayStateError

FORMAT = "relaydiff-relay-state"
VERSION = 2
_VERSION_NOTES = {1: "version 1 predates the pooled embeddings, time ids and noise schedule of version 2; "
                     "re-run the host half with this relaydiff"}
MAX_STATE_BYTES = 64 * 1024 * 1024  # 64 MiB: an SD-size state (4x64x64 latent + 2x77x768 embeddings) is ~0.5 MiB
_META_KEY = "relaydiff"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TIMESTEP_DTYPES = (torch.int64, torch.int32, torch.float32, torch.float64)
# semantic bounds: values that pass the structural checks but that no real trajectory has
MAX_STEPS = 10_000  # the protocol's cap on Progress.total
MAX_BATCH = 64  # latents per state
MAX_TRAIN_TIMESTEPS = 100_000  # scheduler_config num_train_timesteps
MAX_GUIDANCE = 100.0  # classifier-free guidance scale
_CONFIG_CHOICES = {  # scheduler_config keys diffusers reads, and the values it accepts
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample", "flow_prediction"),
}
# Conditioning fields beyond the per-token embeddings: each travels as NAME (conditional) and negative_NAME
EXTRA_CONDITIONING = ("pooled_text_embeds", "time_ids", "pooled_projections")
MAX_EXTRA_WIDTH = 16_384  # widest pooled embedding / time-id vector accepted


@dataclass(frozen=True)
class RelayState:
    """A trajectory paused after ``step_index`` of ``len(timesteps)`` steps.

    Construction does not validate (see the module docstring): :meth:`from_bytes` and :func:`validate` do.
    """

    latents: torch.Tensor  # (B, C, H, W) latent after the host's last step
    step_index: int  # k: the number of steps already taken; the device runs [k, N)
    timesteps: torch.Tensor  # (N,) the whole timestep grid of the trajectory
    sampler: str  # relaydiff sampler name (see relaydiff.core.schedulers.SAMPLERS)
    scheduler_config: dict[str, Any]  # the full diffusers config the trajectory was run with
    guidance_scale: float  # classifier-free guidance scale (<= 1 means no CFG)
    prompt_embeds: torch.Tensor  # (B, L, D) conditional text embeddings
    negative_prompt_embeds: torch.Tensor | None = None  # (B, L, D) unconditional embeddings when CFG is on
    history: dict[str, torch.Tensor] = field(default_factory=dict)  # multistep solver tensors
    history_ints: dict[str, int] = field(default_factory=dict)  # multistep solver counters
    sigmas: torch.Tensor | None = None  # (N+1,) sigma grid for samplers that have one
    generator_state: torch.Tensor | None = None  # uint8 CPU torch.Generator state (stochastic samplers)
    prompt: str = ""  # the prompt, for logs and device-only fallbacks
    negative_prompt: str = ""
    seed: int | None = None  # the seed the initial noise was drawn with
    family_id: str = ""  # identifies the model family the latent belongs to
    cache_budget: int | None = None  # B: full UNet passes the device may spend on its N - k steps (None: every step full)
    noise_schedule: dict[str, Any] = field(default_factory=dict)  # relaydiff.core.schedulers.noise_schedule of the
    #   family ({"kind": "diffusion" | "flow", ...}; a flow family's "shift" among them); {} = from scheduler_config
    mu: float | None = None  # a flow family's dynamic shift (use_dynamic_shifting), None for a fixed shift
    pooled_text_embeds: torch.Tensor | None = None  # (B, P) SDXL's pooled text embeddings (the UNet's "text_embeds")
    negative_pooled_text_embeds: torch.Tensor | None = None  # (B, P) their unconditional twin (CFG)
    time_ids: torch.Tensor | None = None  # (B, T) SDXL micro-conditioning (T = 6: original size, crop, target size)
    negative_time_ids: torch.Tensor | None = None  # (B, T) unconditional time ids (CFG)
    pooled_projections: torch.Tensor | None = None  # (B, P) SD3's pooled CLIP-L + CLIP-G projections
    negative_pooled_projections: torch.Tensor | None = None  # (B, P) their unconditional twin (CFG)

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def conditioning(self) -> Any:
        """The conditional :class:`relaydiff.core.denoiser.Conditioning` (float32)."""
        from relaydiff.core.denoiser import Conditioning

        return Conditioning(self.prompt_embeds, **{n: getattr(self, n) for n in EXTRA_CONDITIONING}).float()

    def negative_conditioning(self) -> Any:
        """The unconditional Conditioning (float32), or None without CFG embeddings."""
        from relaydiff.core.denoiser import Conditioning

        if self.negative_prompt_embeds is None:
            return None
        return Conditioning(self.negative_prompt_embeds,
                            **{n: getattr(self, f"negative_{n}") for n in EXTRA_CONDITIONING}).float()

    def __post_init__(self) -> None:  # fills the noise schedule in; validation is the consumer's (once per hop)
        if not self.noise_schedule and isinstance(self.scheduler_config, dict):
            from relaydiff.core.schedulers import noise_schedule

            object.__setattr__(self, "noise_schedule", noise_schedule(self.scheduler_config))
    def to_bytes(self) -> bytes:
        """Serialize to a safetensors buffer; identical states give identical bytes."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {
            "latents": self.latents,
            "timesteps": self.timesteps,
            "prompt_embeds": self.prompt_embeds,
        }
        if self.negative_prompt_embeds is not None:
            tensors["negative_prompt_embeds"] = self.negative_prompt_embeds
        if self.sigmas is not None:
            tensors["sigmas"] = self.sigmas
        if self.generator_state is not None:
            tensors["generator_state"] = self.generator_state
        for key, value in self.history.items():
            tensors[f"history.{key}"] = value
        for name in EXTRA_CONDITIONING:
            for key in (name, f"negative_{name}"):
                if getattr(self, key) is not None:
                    tensors[key] = getattr(self, key)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step_index": self.step_index,
            "sampler": self.sampler,
            "scheduler_config": self.scheduler_config,
            "guidance_scale": self.guidance_scale,
            "history_ints": self.history_ints,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "family_id": self.family_id,
            "noise_schedule": self.noise_schedule,
            "mu": self.mu,
        }
        if self.cache_budget is not None:  # written only when set: a state without a budget has the same bytes as before
            meta["cache_budget"] = self.cache_budget
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        return save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_STATE_BYTES) -> "RelayState":
        """Parse and validate a buffer written by :meth:`to_bytes`.

        This is the one place a state from the wire or a file is checked: it runs :func:`validate`.

        Raises:
            RelayStateError: oversized, not a relay state, wrong version, missing fields,
                wrong dtypes or shapes, non-finite tensors (anything torch or safetensors refuses included).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RelayStateError(f"relay state must be bytes, got {type(data).__name__}")
        if len(data) > max_bytes:
            raise RelayStateError(f"relay state is {len(data)} bytes; the cap is {max_bytes}")
        try:
            tensors = load(bytes(data))
            meta_raw = _read_metadata(bytes(data))
        except (SafetensorError, ValueError, OSError, RuntimeError, OverflowError, TypeError) as exc:
            raise RelayStateError(f"relay state is not a valid safetensors buffer: {exc}") from None
        if meta_raw is None:
            raise RelayStateError("relay state has no 'relaydiff' metadata entry")
        try:
            meta = json.loads(meta_raw)
        except json.JSONDecodeError as exc:
            raise RelayStateError(f"relay state metadata is not JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RelayStateError(f"not a relay state (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
        if meta.get("version") != VERSION:
            version = meta.get("version")
            note = _VERSION_NOTES.get(version, "") if isinstance(version, int) else ""
            raise RelayStateError(f"relay state version {meta.get('version')!r} is not supported; expected {VERSION}"
                                  + (f" ({note})" if note else ""))
        for key in ("latents", "timesteps", "prompt_embeds"):
            if key not in tensors:
                raise RelayStateError(f"relay state lacks tensor {key!r}")
        known = {"latents", "timesteps", "prompt_embeds", "negative_prompt_embeds", "sigmas", "generator_state",
                 *EXTRA_CONDITIONING, *(f"negative_{n}" for n in EXTRA_CONDITIONING)}
        extra = [k for k in tensors if k not in known and not k.startswith("history.")]
        if extra:
            raise RelayStateError(f"relay state has unexpected tensors {sorted(extra)}")
        try:
            state = cls(
                latents=tensors["latents"],
                step_index=_typed(meta, "step_index", int),
                timesteps=tensors["timesteps"],
                sampler=_typed(meta, "sampler", str),
                scheduler_config=_typed(meta, "scheduler_config", dict),
                guidance_scale=float(_typed(meta, "guidance_scale", (int, float))),
                prompt_embeds=tensors["prompt_embeds"],
                negative_prompt_embeds=tensors.get("negative_prompt_embeds"),
                history={k[len("history."):]: v for k, v in tensors.items() if k.startswith("history.")},
                history_ints={str(k): int(v) for k, v in _typed(meta, "history_ints", dict).items()},
                sigmas=tensors.get("sigmas"),
                generator_state=tensors.get("generator_state"),
                prompt=_typed(meta, "prompt", str),
                negative_prompt=_typed(meta, "negative_prompt", str),
                seed=meta.get("seed"),
                family_id=_typed(meta, "family_id", str),
                cache_budget=_typed(meta, "cache_budget", int) if "cache_budget" in meta else None,
                noise_schedule=_typed(meta, "noise_schedule", dict),
                mu=None if meta.get("mu") is None else float(_typed(meta, "mu", (int, float))),
                **{k: tensors.get(k) for n in EXTRA_CONDITIONING for k in (n, f"negative_{n}")},
            )
        except (TypeError, ValueError) as exc:
            raise RelayStateError(f"relay state metadata is malformed: {exc}") from None
        try:
            validate(state)
        except (ValueError, TypeError, RuntimeError, OverflowError) as exc:  # torch's own errors on hostile tensors
            raise RelayStateError(f"relay state cannot be read: {type(exc).__name__}: {exc}") from None
        return state


def _read_metadata(data: bytes) -> str | None:
    """Read the safetensors header's ``__metadata__`` entry (the header is JSON by the format's spec)."""
    if len(data) < 8:
        raise ValueError("buffer shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds the buffer")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    value = meta.get(_META_KEY)
    return value if isinstance(value, str) else None


def _typed(meta: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in meta:
        raise RelayStateError(f"relay state metadata lacks {key!r}")
    value = meta[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise RelayStateError(f"relay state metadata {key!r} has value {value!r}; expected {types}")
    return value


def _finite(t: torch.Tensor) -> bool:
    """All elements finite: one float64 sum (NaN/Inf propagate; finite float32 values cannot overflow it)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def validate(state: RelayState) -> None:
    """Check shapes, dtypes, ranges and finiteness of a relay state; raises RelayStateError."""
    from relaydiff.core.schedulers import SAMPLERS

    lat = state.latents
    if not isinstance(lat, torch.Tensor) or lat.ndim != 4:
        raise RelayStateError(f"latents must be a 4-D tensor (B, C, H, W), got shape {tuple(getattr(lat, 'shape', ()))}")
    if lat.dtype not in _FLOAT_DTYPES:
        raise RelayStateError(f"latents dtype {lat.dtype} is not float32/float16/bfloat16")
    if not _finite(lat):
        raise RelayStateError("latents contain NaN or Inf values")
    ts = state.timesteps
    if not isinstance(ts, torch.Tensor) or ts.ndim != 1 or ts.shape[0] < 1:
        raise RelayStateError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(getattr(ts, 'shape', ()))}")
    if ts.dtype not in _TIMESTEP_DTYPES or (ts.dtype.is_floating_point and not _finite(ts)):
        raise RelayStateError(f"timesteps must be finite int64/int32/float32/float64, got dtype {ts.dtype}")
    if state.seed is not None and (isinstance(state.seed, bool) or not isinstance(state.seed, int)):
        raise RelayStateError(f"seed must be an integer or null, got {state.seed!r}")
    n = int(ts.shape[0])
    if isinstance(state.step_index, bool) or not isinstance(state.step_index, int) or not 0 <= state.step_index <= n:
        raise RelayStateError(f"relay step {state.step_index!r} is outside [0, {n}]")
    budget = state.cache_budget
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n - state.step_index):
        raise RelayStateError(
            f"cache budget {budget!r} is outside [1, {n - state.step_index}]: the device runs N - k = "
            f"{n} - {state.step_index} steps and spends at least its first full pass"
        )
    if state.sampler not in SAMPLERS:
        raise RelayStateError(f"unknown sampler {state.sampler!r}; expected one of {sorted(SAMPLERS)}")
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        emb = getattr(state, name)
        if emb is None:
            continue
        if not isinstance(emb, torch.Tensor) or emb.ndim != 3 or emb.shape[0] != lat.shape[0]:
            raise RelayStateError(
                f"{name} must be (B, L, D) with B = {lat.shape[0]}, got shape {tuple(getattr(emb, 'shape', ()))}"
            )
        if emb.dtype not in _FLOAT_DTYPES or not _finite(emb):
            raise RelayStateError(f"{name} must be finite floats (dtype {emb.dtype})")
    if state.guidance_scale > 1.0 and state.negative_prompt_embeds is None:
        raise RelayStateError(f"guidance scale {state.guidance_scale} needs negative_prompt_embeds")
    if state.negative_prompt_embeds is not None and state.negative_prompt_embeds.shape != state.prompt_embeds.shape:
        raise RelayStateError(
            f"negative_prompt_embeds shape {tuple(state.negative_prompt_embeds.shape)} differs from "
            f"prompt_embeds shape {tuple(state.prompt_embeds.shape)}"
        )
    if state.sigmas is not None:
        if state.sigmas.ndim != 1 or state.sigmas.shape[0] != n + 1:
            raise RelayStateError(f"sigmas must have shape ({n + 1},), got {tuple(state.sigmas.shape)}")
        if state.sigmas.dtype not in _FLOAT_DTYPES or not _finite(state.sigmas):
            raise RelayStateError(f"sigmas must be finite floats, got dtype {state.sigmas.dtype}")
    for key, value in state.history.items():
        if value.dtype not in _FLOAT_DTYPES:
            raise RelayStateError(f"solver history {key!r} must be a float tensor, got dtype {value.dtype}")
        if value.shape != lat.shape or not torch.isfinite(value).all():
            raise RelayStateError(
                f"solver history {key!r} must be finite with the latent shape {tuple(lat.shape)}, got {tuple(value.shape)}"
            )
    _validate_conditioning(state)
    gen = state.generator_state
    if gen is not None and (gen.dtype != torch.uint8 or gen.ndim != 1 or gen.numel() > 1 << 16):
        raise RelayStateError(f"generator_state must be a 1-D uint8 tensor, got {gen.dtype} of shape {tuple(gen.shape)}")
    _validate_semantics(state)


def _validate_conditioning(state: RelayState) -> None:
    """The added conditioning: (B, W) finite floats, a negative twin exactly when CFG embeddings travel."""
    batch = int(state.latents.shape[0])
    cfg = state.negative_prompt_embeds is not None
    for name in EXTRA_CONDITIONING:
        pos, neg = getattr(state, name), getattr(state, f"negative_{name}")
        for key, value in ((name, pos), (f"negative_{name}", neg)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != batch \
                    or not 1 <= value.shape[1] <= MAX_EXTRA_WIDTH:
                raise RelayStateError(f"{key} must be (B, W) with B = {batch} and 1 <= W <= {MAX_EXTRA_WIDTH}, "
                                      f"got shape {tuple(getattr(value, 'shape', ()))}")
            if value.dtype not in _FLOAT_DTYPES or not _finite(value):
                raise RelayStateError(f"{key} must be finite floats (dtype {value.dtype})")
        if neg is not None and pos is None:
            raise RelayStateError(f"negative_{name} travels without {name}")
        if pos is not None and cfg != (neg is not None):
            raise RelayStateError(f"{name} needs negative_{name} exactly when negative_prompt_embeds travel "
                                  f"(negative_prompt_embeds {'present' if cfg else 'absent'})")
        if pos is not None and neg is not None and pos.shape != neg.shape:
            raise RelayStateError(f"negative_{name} shape {tuple(neg.shape)} differs from {name} shape {tuple(pos.shape)}")


def _validate_schedule(state: RelayState) -> None:
    """The noise schedule record: a known kind, consistent with the sampler config it travels with; a flow
    schedule's finite positive shift, its sigmas in [0, 1] and ``mu`` exactly when it shifts dynamically."""
    from relaydiff.core.schedulers import SAMPLERS, noise_schedule

    sched = state.noise_schedule
    if not isinstance(sched, dict) or sched.get("kind") not in ("diffusion", "flow"):
        raise RelayStateError(f"noise_schedule must be an object with kind 'diffusion' or 'flow', got {sched!r}")
    derived = noise_schedule(state.scheduler_config)
    cfg = state.scheduler_config
    for key, value in derived.items():
        explicit = key in ("kind", "prediction_type") or key in cfg or (key == "shift" and "flow_shift" in cfg)
        if explicit and sched.get(key) != value:
            raise RelayStateError(f"noise_schedule {key!r} is {sched.get(key)!r}; the scheduler config gives {value!r}")
    flow = sched["kind"] == "flow"
    if SAMPLERS[state.sampler].flow != flow:
        raise RelayStateError(f"sampler {state.sampler!r} does not sample a {sched['kind']} schedule")
    if not flow:
        if state.mu is not None:
            raise RelayStateError(f"mu is {state.mu!r}; a diffusion schedule has no dynamic shift")
        return
    shift = sched.get("shift")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or not 0 < shift <= 1000:
        raise RelayStateError(f"flow shift is {shift!r}; expected a finite number in (0, 1000]")
    dynamic = sched.get("use_dynamic_shifting")
    if not isinstance(dynamic, bool):
        raise RelayStateError(f"noise_schedule 'use_dynamic_shifting' is {dynamic!r}; expected true or false")
    if dynamic != (state.mu is not None):
        raise RelayStateError(f"mu is {state.mu!r}; it travels exactly when the flow schedule shifts dynamically "
                              f"(use_dynamic_shifting {dynamic})")
    if state.mu is not None and (not math.isfinite(state.mu) or abs(state.mu) > 100):
        raise RelayStateError(f"mu is {state.mu!r}; expected a finite number in [-100, 100]")
    if state.sigmas is None:
        raise RelayStateError("a flow relay state must carry its sigmas")
    if bool((state.sigmas < 0).any()) or bool((state.sigmas > 1).any()):
        raise RelayStateError(f"flow sigmas must lie in [0, 1], got {state.sigmas[:8].tolist()}...")


def _validate_semantics(state: RelayState) -> None:
    """Values that pass the shape and dtype checks but that no trajectory has (each would crash or mislead the
    device later): empty or oversized tensors, a grid beyond MAX_STEPS, timesteps off the training range,
    non-finite or absurd guidance, scheduler settings diffusers does not know, a generator state torch refuses."""
    lat, emb = state.latents, state.prompt_embeds
    if lat.numel() == 0 or emb.numel() == 0:
        raise RelayStateError(
            f"latents {tuple(lat.shape)} and prompt_embeds {tuple(emb.shape)} must have no zero-size dimension"
        )
    if lat.shape[0] > MAX_BATCH:
        raise RelayStateError(f"latents hold a batch of {lat.shape[0]}; the cap is {MAX_BATCH}")
    n = state.num_inference_steps
    if n > MAX_STEPS:
        raise RelayStateError(f"the timestep grid has {n} steps; the cap is {MAX_STEPS}")
    g = state.guidance_scale
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
        raise RelayStateError(f"guidance scale is {g!r}; expected a finite number in [0, {MAX_GUIDANCE:g}]")
    cfg = state.scheduler_config
    if not isinstance(cfg, dict):
        raise RelayStateError(f"scheduler_config must be an object, got {type(cfg).__name__}")
    for key, choices in _CONFIG_CHOICES.items():
        if key in cfg and cfg[key] not in choices:
            raise RelayStateError(f"scheduler_config {key!r} is {cfg[key]!r}; expected one of {list(choices)}")
    train = cfg.get("num_train_timesteps", 1000)
    if isinstance(train, bool) or not isinstance(train, int) or not 1 <= train <= MAX_TRAIN_TIMESTEPS:
        raise RelayStateError(f"scheduler_config 'num_train_timesteps' is {train!r}; expected an integer in [1, {MAX_TRAIN_TIMESTEPS}]")
    if n > train:
        raise RelayStateError(f"the timestep grid has {n} steps; the scheduler trains on only {train} timesteps")
    offset = cfg.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < train:
        raise RelayStateError(f"scheduler_config 'steps_offset' is {offset!r}; expected an integer in [0, {train})")
    for key in ("beta_start", "beta_end"):
        beta = cfg.get(key, 0.01)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:  # NaN fails too
            raise RelayStateError(f"scheduler_config {key!r} is {beta!r}; expected a number in (0, 1)")
    if cfg.get("trained_betas") is not None:
        raise RelayStateError("scheduler_config 'trained_betas' must be null (a relay state carries the named schedule only)")
    order = cfg.get("solver_order", 2)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise RelayStateError(f"scheduler_config 'solver_order' is {order!r}; expected 1, 2 or 3")
    ts = state.timesteps.double()
    if bool((ts < 0).any()) or bool((ts > train).any()):
        raise RelayStateError(f"timesteps must lie in [0, {train}] (num_train_timesteps), got {state.timesteps[:8].tolist()}...")
    for key, value in state.history_ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEPS:
            raise RelayStateError(f"history_ints {key!r} is {value!r}; expected an integer in [0, {MAX_STEPS}]")
    if state.seed is not None and not -(1 << 63) <= state.seed < 1 << 64:
        raise RelayStateError(f"seed {state.seed!r} is outside the 64-bit range")
    _validate_schedule(state)
    if state.generator_state is not None:
        try:
            torch.Generator("cpu").set_state(state.generator_state)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RelayStateError(f"generator_state is not a CPU torch.Generator state: {exc}") from None


MAX_LATENT_BYTES = 16 * 1024 * 1024  # the link's cap on a Result blob


def latents_to_bytes(latents: torch.Tensor) -> bytes:
    """A final latent (B, C, H, W) as the safetensors buffer a ``latent`` Result carries (one tensor, "latents")."""
    from safetensors.torch import save

    return save({"latents": latents.detach().contiguous().cpu()})


def latents_from_bytes(data: bytes, *, max_bytes: int = MAX_LATENT_BYTES) -> torch.Tensor:
    """Parse and check the blob of a ``latent`` Result: exactly one finite 4-D float tensor named "latents".

    Raises:
        RelaydiffError: oversized, not a safetensors buffer, other tensors, wrong rank or dtype, NaN or Inf.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) > max_bytes:
        raise RelaydiffError(f"the latent is {len(data)} bytes; the cap is {max_bytes}")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError) as exc:
        raise RelaydiffError(f"the latent is not a safetensors buffer: {exc}") from None
    lat = tensors.get("latents")
    if set(tensors) != {"latents"} or lat is None:
        raise RelaydiffError(f"the latent buffer holds tensors {sorted(tensors)}; expected exactly ['latents']")
    if lat.ndim != 4 or lat.dtype not in _FLOAT_DTYPES:
        raise RelaydiffError(f"the latent is {lat.dtype} {tuple(lat.shape)}; expected a 4-D float tensor")
    if not _finite(lat):
        raise RelaydiffError("the latent contains NaN or Inf values")
    return lat
