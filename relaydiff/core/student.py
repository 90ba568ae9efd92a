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

import math
from pathlib import Path
from typing import Any

import torch

from relaydiff.core.denoiser import Conditioning, Denoiser
from relaydiff.core.errors import RelaydiffError, RelayStateError

STUDENT_FILE = "relaydiff_student.json"
STUDENT_FORMAT = "relaydiff-student/1"
PARAMETRIZATIONS = ("eps", "lcm")  # the UNet's noise drives the jump, or a consistency function's x0 does
_REQUIRED = {"format": str, "teacher": str, "relay_step": int, "steps": int, "student_steps": int,
             "guidance_scale": float, "sampler": str}


def read_student(unet_dir: Path) -> dict[str, Any] | None:
    """The student description in ``unet_dir``, None when the folder is not a student; malformed -> error."""
    path = Path(unet_dir) / STUDENT_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > 64 * 1024:
        raise RelaydiffError(f"'{path}' is larger than 64 KiB")
    from relaydiff.core.family import read_json

    info = read_json(path)  # valid JSON holding an object, or a clear error
    for key, kind in _REQUIRED.items():
        value = info.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            raise RelaydiffError(f"'{path}': {key!r} must be a {kind.__name__}, got {value!r}")
    if info["format"] != STUDENT_FORMAT:
        raise RelaydiffError(f"'{path}': format is {info['format']!r}; expected {STUDENT_FORMAT!r}")
    if not 1 <= info["student_steps"] <= info["steps"] or not 0 <= info["relay_step"] < info["steps"]:
        raise RelaydiffError(f"'{path}': student_steps/relay_step/steps out of range: {info!r}")
    if info["sampler"] != "ddim":
        raise RelaydiffError(f"'{path}': only 'ddim' students are supported, got {info['sampler']!r}")
    kind = info.setdefault("parametrization", "eps")
    if kind not in PARAMETRIZATIONS:
        raise RelaydiffError(f"'{path}': parametrization must be one of {', '.join(PARAMETRIZATIONS)}, got {kind!r}")
    if kind == "lcm":
        for key in ("timestep_scaling", "sigma_data"):
            v = info.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise RelaydiffError(f"'{path}': an lcm student needs a positive {key!r}, got {v!r}")
    return info


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
    """(alphas_cumprod over the training timesteps, the alpha after the last step) of a DDIM config."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    return sched.alphas_cumprod.float(), torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32)


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


def student_eps(student: dict[str, Any], x: torch.Tensor, eps: torch.Tensor, t: int, a_t: float) -> torch.Tensor:
    """The noise a jump uses: the UNet's own (``eps``), or the one implied by the consistency function's x0 (``lcm``)."""
    if student.get("parametrization", "eps") != "lcm":
        return eps
    x0 = consistency_x0(x, eps, float(t), a_t, float(student["timestep_scaling"]), float(student["sigma_data"]))
    a = torch.as_tensor(a_t, dtype=x.dtype)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


@torch.no_grad()
def student_finish(denoiser: Denoiser, student: dict[str, Any], latents: torch.Tensor, timesteps: torch.Tensor, k: int,
                   cond: torch.Tensor, scheduler_config: dict[str, Any], sampler: str) -> torch.Tensor:
    """Run the student from grid step ``k`` of ``timesteps`` to the end; one denoiser pass (conditional only) per jump."""
    if sampler != student["sampler"]:
        raise RelayStateError(f"the student was distilled on the {student['sampler']!r} sampler; the relay state uses {sampler!r}")
    n = len(timesteps)
    if k >= n:
        return latents
    x = latents.float()
    conditioning = Conditioning(cond)
    for t, a_t, a_s in jump_alphas(timesteps, coarse_indices(n, k, int(student["student_steps"])), scheduler_config):
        eps = denoiser(x, torch.tensor(t), conditioning)
        x = ddim_jump(x, student_eps(student, x, eps, t, a_t), a_t, a_s)
    return x
