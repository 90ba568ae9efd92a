"""Step- and guidance-distilled device students: how the relay core runs one.

A student is a UNet folder of a family (a device variant) with a ``relaydiff_student.json`` beside its
config. It was distilled (``relaydiff distill``, :mod:`relaydiff.quantize.distill`) to finish the DDIM
trajectory of an ``steps``-step grid from relay step k in ``student_steps`` steps, with classifier-free
guidance baked in, so each step is one UNet pass on the conditional embeddings only.

The student's steps are a coarse subset of the relay state's own grid (:func:`coarse_indices`): from the
hand-off timestep t_k it jumps between grid timesteps and finally to the grid's end, each jump a
deterministic DDIM update (eta = 0; Song et al. 2021, eq. 12):

    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t),     x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps

where a is the noise schedule's cumulative alpha (the scheduler's ``final_alpha_cumprod`` after the last
grid step). We write this update instead of calling ``DDIMScheduler.step``, which only steps between
neighbours of an evenly spaced grid.

A student distilled with latent consistency distillation (``"parametrization": "lcm"``) is a consistency
function f(x, t) = c_skip(t) x + c_out(t) x0(eps) (Luo et al. 2023, eq. 9, with the boundary scalings of
diffusers' ``LCMScheduler``); each jump then uses f's x0 and the noise it implies, so the sampler stays the
deterministic DDIM jump (LCM's own multistep sampler re-noises with fresh noise instead).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from relaydiff.core.denoiser import Conditioning, Denoiser
from relaydiff.core.errors import RelaydiffError, RelayStateError

if TYPE_CHECKING:
    from relaydiff.core.caching.device import DeviceCache

STUDENT_FILE = "relaydiff_student.json"
STUDENT_FORMAT = "relaydiff-student/1"
STUDENT_SCHEMA = Path(__file__).with_name("student.schema.json")
MAX_STUDENT_BYTES = 64 * 1024


@dataclass(frozen=True)
class StudentSpec:
    """A distilled student's ``relaydiff_student.json``: what it was distilled for and how its jumps are taken.

    Read and validated in one place (:meth:`from_json`, against ``student.schema.json`` beside this file);
    the relay, calibration, bundles and evaluation use the fields, never the raw dict.
    """

    teacher: str  # the device variant it was distilled from
    relay_step: int  # k: the hand-off step it starts from
    steps: int  # N: the grid the relay state carries
    student_steps: int  # M: jumps (one conditional pass each) from k to the end
    guidance_scale: float  # the teacher's CFG scale, baked in
    sampler: str = "ddim"  # the only sampler a student jumps with
    parametrization: str = "eps"  # "eps": the output is noise; "lcm": a consistency function's x0 drives the jump
    timestep_scaling: float | None = None  # lcm only: c_skip/c_out timestep scaling
    sigma_data: float | None = None  # lcm only: c_skip/c_out sigma_data
    method: str | None = None  # how it was distilled ("progressive", "lcm"), for reports
    coarse_timesteps: tuple[int, ...] = ()  # the grid timesteps of its jumps, for reports
    teacher_unet_passes: int | None = None  # UNet passes of the teacher over [k, N), for reports
    student_unet_passes: int | None = None  # UNet passes of the student over [k, N), for reports
    training: Mapping[str, Any] | None = field(default=None, compare=False)  # the distillation run's figures, recorded only

    @classmethod
    def from_json(cls, data: Any, *, where: str = "student") -> StudentSpec:
        """Validate ``data`` (a parsed relaydiff_student.json) against the schema and the grid's ranges.

        Raises:
            RelaydiffError: naming every schema problem, or the out-of-range values.
        """
        import jsonschema

        validator = jsonschema.Draft202012Validator(json.loads(STUDENT_SCHEMA.read_text()))
        problems = [f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        if problems:
            raise RelaydiffError(f"'{where}' is not a relaydiff student description: " + "; ".join(problems))
        if data["sampler"] != "ddim":
            raise RelaydiffError(f"'{where}': only 'ddim' students are supported, got {data['sampler']!r}")
        if not 1 <= data["student_steps"] <= data["steps"] or not 0 <= data["relay_step"] < data["steps"]:
            raise RelaydiffError(f"'{where}': student_steps/relay_step/steps out of range: {data!r}")
        spec = cls(
            teacher=data["teacher"], relay_step=data["relay_step"], steps=data["steps"], student_steps=data["student_steps"],
            guidance_scale=float(data["guidance_scale"]), sampler=data["sampler"], parametrization=data.get("parametrization", "eps"),
            timestep_scaling=_opt_float(data.get("timestep_scaling")), sigma_data=_opt_float(data.get("sigma_data")),
            method=data.get("method"), coarse_timesteps=tuple(data.get("coarse_timesteps", ())),
            teacher_unet_passes=data.get("teacher_unet_passes"), student_unet_passes=data.get("student_unet_passes"),
            training=data.get("training"),
        )
        if spec.parametrization == "lcm" and (spec.timestep_scaling is None or spec.sigma_data is None):
            raise RelaydiffError(f"'{where}': an lcm student needs a positive 'timestep_scaling' and 'sigma_data'")
        for name in ("guidance_scale", "timestep_scaling", "sigma_data"):  # JSON Schema has no finiteness keyword
            value = getattr(spec, name)
            if value is not None and not math.isfinite(value):
                raise RelaydiffError(f"'{where}': {name} must be a finite number, got {value!r}")
        return spec

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`from_json` reads back (optional fields only when set)."""
        data: dict[str, Any] = {"format": STUDENT_FORMAT, "teacher": self.teacher, "relay_step": self.relay_step,
                                "steps": self.steps, "student_steps": self.student_steps,
                                "guidance_scale": self.guidance_scale, "sampler": self.sampler,
                                "parametrization": self.parametrization}
        optional = {"timestep_scaling": self.timestep_scaling, "sigma_data": self.sigma_data, "method": self.method,
                    "coarse_timesteps": list(self.coarse_timesteps) or None, "teacher_unet_passes": self.teacher_unet_passes,
                    "student_unet_passes": self.student_unet_passes, "training": self.training}
        data.update({k: v for k, v in optional.items() if v is not None})
        return data

    def write(self, unet_dir: Path) -> Path:
        """Write ``relaydiff_student.json`` into ``unet_dir``; returns its path."""
        path = Path(unet_dir) / STUDENT_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_student(unet_dir: Path) -> StudentSpec | None:
    """The student description in ``unet_dir``, None when the folder is not a student; malformed -> RelaydiffError."""
    path = Path(unet_dir) / STUDENT_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_STUDENT_BYTES:
        raise RelaydiffError(f"'{path}' is larger than {MAX_STUDENT_BYTES // 1024} KiB")
    from relaydiff.core.family import read_json

    return StudentSpec.from_json(read_json(path), where=str(path))  # read_json: valid JSON holding an object, or a clear error


def coarse_indices(n: int, k: int, m: int) -> list[int]:
    """Grid indices the student evaluates: m points from k spread over [k, n), ascending, distinct."""
    if not 0 <= k < n or m < 1:
        raise RelaydiffError(f"cannot place {m} student steps in grid steps [{k}, {n})")
    m = min(m, n - k)
    return sorted({k + math.floor(i * (n - k) / m) for i in range(m)})


def ddim_jump(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor | float, a_s: torch.Tensor | float) -> torch.Tensor:
    """Deterministic DDIM update of ``x`` at cumulative alpha ``a_t`` to ``a_s`` with predicted noise ``eps``."""
    a_t = torch.as_tensor(a_t, dtype=x.dtype)
    a_s = torch.as_tensor(a_s, dtype=x.dtype)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def schedule_alphas(scheduler_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas_cumprod over the training timesteps, the alpha after the last step) of a DDIM config.

    Computed once per config (``DDIMScheduler.from_config`` costs ~6 ms; a budgeted device half asks for it
    when it builds its schedule); callers get their own copies.
    """
    key = json.dumps(scheduler_config, sort_keys=True, default=repr)
    hit = _ALPHAS.get(key)
    if hit is None:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(scheduler_config)
        hit = (sched.alphas_cumprod.float(), torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32))
        with _ALPHAS_LOCK:
            while len(_ALPHAS) >= 32:  # configs can come from the wire: keep a bounded number (oldest dropped)
                _ALPHAS.pop(next(iter(_ALPHAS)))
            _ALPHAS[key] = hit
    return hit[0].clone(), hit[1].clone()


_ALPHAS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_ALPHAS_LOCK = threading.Lock()


def jump_alphas(timesteps: torch.Tensor, indices: list[int], scheduler_config: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(timestep, a_t, a_s) of each student jump along ``indices`` of the grid ``timesteps``."""
    ac, final = schedule_alphas(scheduler_config)
    out = []
    for j, idx in enumerate(indices):
        t = int(timesteps[idx])
        a_s = ac[int(timesteps[indices[j + 1]])] if j + 1 < len(indices) else final
        out.append((t, float(ac[t]), float(a_s)))
    return out


def lcm_scalings(t: torch.Tensor | float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency boundary condition at timestep t (as diffusers' LCMScheduler: f = x at t = 0)."""
    st = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_x0(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float, a_t: torch.Tensor | float,
                   timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> torch.Tensor:
    """f(x, t) = c_skip x + c_out x0, with x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t); ``t`` and ``a_t`` broadcast over x."""
    a_t = torch.as_tensor(a_t, dtype=x.dtype)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    c_skip, c_out = lcm_scalings(t, timestep_scaling, sigma_data)
    return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * x0


def student_eps(student: StudentSpec, x: torch.Tensor, eps: torch.Tensor, t: int, a_t: float) -> torch.Tensor:
    """The noise a jump uses: the UNet's own (``eps``), or the one implied by the consistency function's x0 (``lcm``)."""
    if student.parametrization != "lcm" or student.timestep_scaling is None or student.sigma_data is None:
        return eps
    x0 = consistency_x0(x, eps, float(t), a_t, student.timestep_scaling, student.sigma_data)
    a = torch.as_tensor(a_t, dtype=x.dtype)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


@torch.no_grad()
def student_finish(denoiser: Denoiser, student: StudentSpec, latents: torch.Tensor, timesteps: torch.Tensor, k: int,
                   cond: torch.Tensor, scheduler_config: dict[str, Any], sampler: str, *, cache: DeviceCache | None = None,
                   budget: int | None = None) -> torch.Tensor:
    """Run the student from grid step ``k`` of ``timesteps`` to the end; one denoiser pass (conditional only) per jump.

    With ``cache`` and a budget B, min(B, jumps) jumps are full passes (the uniform schedule over the jumps) and
    the others reuse the deep features of the last full one.
    """
    if sampler != student.sampler:
        raise RelayStateError(f"the student was distilled on the {student.sampler!r} sampler; the relay state uses {sampler!r}")
    n = len(timesteps)
    if k >= n:
        return latents
    x = latents.float()
    conditioning = Conditioning(cond)
    jumps = jump_alphas(timesteps, coarse_indices(n, k, student.student_steps), scheduler_config)
    if cache is not None and budget is not None:
        from relaydiff.core.caching.budget import uniform_mask
        from relaydiff.core.caching.device import cached_steps

        def jump(eps: torch.Tensor, j: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            _t, a_t, a_s = jumps[j]
            return ddim_jump(x, student_eps(student, x, eps, int(t), a_t), a_t, a_s)

        steps = [(j, torch.tensor(t)) for j, (t, _a, _b) in enumerate(jumps)]

        full = uniform_mask(len(jumps), min(budget, len(jumps)))
        return cached_steps(cache, None, x, (cond, None), 1.0, steps, full, jump, scale=False)
    for t, a_t, a_s in jumps:
        eps = denoiser(x, torch.tensor(t), conditioning)
        x = ddim_jump(x, student_eps(student, x, eps, t, a_t), a_t, a_s)
    return x
