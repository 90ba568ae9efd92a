"""Relay-aware step and guidance distillation of the device UNet: ``relaydiff distill``.

The device half of a relay only runs the late steps [k, N) of an N-step DDIM trajectory, with classifier-free
guidance (two UNet passes per step). The student (initialised from the device UNet, same architecture)
learns to cover the same range in M jumps of one pass each:

1. **Relay-aware inputs.** Each training batch starts where a real relay hands over: world prompts are run
   through the *host* model (with CFG, :func:`relaydiff.core.relay.start_batch`) for k steps, giving x_{t_k}
   and the prompt embeddings the device receives.
2. **Teacher trajectory.** The device UNet (the teacher) finishes each batch with N - k DDIM steps with CFG at
   the family's guidance scale; the latents at the student's coarse grid points
   (:func:`relaydiff.core.student.coarse_indices`) and at the end are kept.
3. **Student regression.** For every coarse jump i the student, given the teacher's latent at point i and the
   conditional embeddings only, takes one DDIM jump (:func:`relaydiff.core.student.ddim_jump`) and is trained
   to land on the teacher's latent at point i + 1 (mean squared error in latent space). This is one round of
   progressive distillation (Salimans & Ho 2022) compressed N - k -> M at once, with the guided teacher as
   target as in guidance distillation (Meng et al. 2023), restricted to the relay range.

Recent batches are kept in a small replay buffer, so each expensive host + teacher batch feeds several
student updates. Checkpoints (safetensors + JSON) make the run resumable; the result is a diffusers UNet folder
``unet_student/`` with ``relaydiff_student.json`` and a ``student`` variant in ``family.json``.

``method="lcm"`` is the alternative, latent consistency distillation (Luo et al. 2023) made relay-aware: the
student is a consistency function f(x, t) = c_skip x + c_out x0 (:func:`relaydiff.core.student.consistency_x0`)
trained so that f at a point of the guided teacher trajectory matches an EMA target network's f at the next
point (the teacher's one DDIM step, i.e. LCM's skipping-step solver with the teacher grid's spacing), and
f = x at the trajectory's end; pseudo-Huber loss and a target EMA of 0.95 as in LCM. Both students sample
with the same deterministic DDIM jumps, so the objectives are compared on equal terms
(``relaydiff eval distill``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from relaydiff.core.errors import RelaydiffError

STUDENT_SUBFOLDER = "unet_student"
STUDENT_VARIANT = "student"
METHODS = ("progressive", "lcm")
LCM_TIMESTEP_SCALING = 10.0  # diffusers LCMScheduler's default boundary-condition scaling
LCM_SIGMA_DATA = 0.5
LCM_HUBER_C = 0.001  # pseudo-Huber constant of LCM's training script
LCM_TARGET_EMA = 0.95  # EMA decay of LCM's target network
LCM_POINTS_PER_TRAJECTORY = 4  # trajectory points drawn per prompt per update (the progressive student uses its M jumps)


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run."""

    family: Path  # family folder (host + device variants); the student is written into it
    relay_step: int = 8  # k the student is distilled for (of `steps`)
    steps: int = 25  # N of the teacher's DDIM grid
    student_steps: int = 4  # M jumps of the student
    guidance_scale: float = 5.0  # the teacher's CFG scale, baked into the student
    minutes: float = 25.0  # wall-clock budget of the training loop
    max_updates: int = 100_000  # update cap
    batch_size: int = 32  # prompts per generated batch
    updates_per_batch: int = 3  # student updates per newly generated batch (drawn from the replay buffer)
    buffer_batches: int = 12  # generated batches kept in the replay buffer
    lr: float = 1e-4  # AdamW learning rate (constant after warm-up)
    warmup: int = 50  # linear warm-up updates
    ema_decay: float = 0.995  # EMA of the student weights (what is saved); 0 disables
    seed: int = 0
    threads: int = 2  # torch threads
    checkpoint_every_s: float = 120.0
    variant: str = STUDENT_VARIANT  # family variant name of the student
    subfolder: str = STUDENT_SUBFOLDER  # its folder in the family
    method: str = "progressive"  # "progressive": regress the teacher's jump endpoints; "lcm": consistency distillation

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RelaydiffError(f"distillation method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not Path(self.family).is_dir():
            raise RelaydiffError(f"family folder {str(self.family)!r} does not exist")
        for name in ("steps", "student_steps", "max_updates", "batch_size", "updates_per_batch", "buffer_batches", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RelaydiffError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.relay_step, bool) or not isinstance(self.relay_step, int) or not 0 <= self.relay_step < self.steps:
            raise RelaydiffError(f"relay step {self.relay_step!r} is outside [0, {self.steps}) (steps = {self.steps})")
        if self.student_steps > self.steps - self.relay_step:
            raise RelaydiffError(
                f"student steps {self.student_steps} exceed the {self.steps - self.relay_step} teacher steps after the relay step")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 1.0):
            raise RelaydiffError(f"guidance scale must be >= 1, got {self.guidance_scale!r}")
        if not (math.isfinite(self.minutes) and self.minutes > 0):
            raise RelaydiffError(f"minutes must be > 0, got {self.minutes!r}")


def _teacher_points(device: Any, states: list[Any], indices: list[int], guidance: float) -> tuple[Any, Any, list[Any]]:
    """Batched guided DDIM from each state's k to the end; latents at ``indices`` and at the end."""
    import torch

    from relaydiff.core.schedulers import build_scheduler

    x = torch.cat([s.latents for s in states])
    cond = torch.cat([s.prompt_embeds for s in states])
    uncond = torch.cat([s.negative_prompt_embeds for s in states])
    sched = build_scheduler("ddim", device.scheduler_config)
    n = len(states[0].timesteps)
    sched.set_timesteps(n)
    points = []
    with torch.no_grad():
        for i in range(states[0].step_index, n):
            if i in indices:
                points.append(x.clone())
            t = sched.timesteps[i]
            eps_u, eps_c = device.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    points.append(x)
    return cond, uncond, points


def distill(config: DistillConfig, *, resume: bool = True, progress: bool = True,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Distil the family's device UNet into a student; returns the report (also in relaydiff_student.json)."""
    import copy

    import torch
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from relaydiff.core import family
    from relaydiff.core.relay import RelayRequest, start_batch
    from relaydiff.core.student import StudentSpec, coarse_indices, ddim_jump, jump_alphas, schedule_alphas
    from relaydiff.world import sample_prompts

    say = log or (lambda _m: None)
    torch.set_num_threads(config.threads)
    root = Path(config.family)
    host = family.load(family.resolve(root, None, role="host"))
    teacher_ref = family.resolve(root, None, role="device")
    teacher = family.load(teacher_ref, share_with=host)
    if teacher.student is not None:
        raise RelaydiffError(f"the default device variant of {root} is already a student; distil from the undistilled one")
    student = copy.deepcopy(teacher.unet).train().requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay > 0 else None
    lcm = config.method == "lcm"
    target_net = copy.deepcopy(student).eval().requires_grad_(False) if lcm else None  # LCM's EMA target network
    target_ema = EMAModel(params, decay=LCM_TARGET_EMA) if lcm else None
    n, k, m = config.steps, config.relay_step, config.student_steps
    indices = coarse_indices(n, k, m)
    kept = list(range(k, n)) if lcm else indices  # trajectory points kept per batch: every one for LCM
    alphas, _final_alpha = schedule_alphas(teacher.scheduler_config)
    ckpt = root / "checkpoints" / ("distill" if config.subfolder == STUDENT_SUBFOLDER else f"distill-{config.subfolder}")
    state: dict[str, Any] = {"updates": 0, "batches": 0, "wall_s": 0.0, "losses": []}
    if resume and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("config") == _plain(config):
            state = saved
            student.load_state_dict(load_file(str(ckpt / "student.safetensors")))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            for averager, name in ((ema, "ema"), (target_ema, "target")):
                if averager is not None:
                    shadow = load_file(str(ckpt / f"{name}.safetensors"))
                    averager.shadow_params = [shadow[str(i)] for i in range(len(params))]
                    averager.optimization_step = state["updates"]
            say(f"resuming distillation at update {state['updates']}")
        else:
            say("checkpoint is from another configuration; starting over")

    def save_ckpt() -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file({kk: v.detach().contiguous() for kk, v in student.state_dict().items()}, str(ckpt / "student.safetensors"))
        torch.save(opt.state_dict(), ckpt / "optimizer.pt")
        for averager, name in ((ema, "ema"), (target_ema, "target")):
            if averager is not None:
                save_file({str(i): p.detach().contiguous() for i, p in enumerate(averager.shadow_params)}, str(ckpt / f"{name}.safetensors"))
        (ckpt / "state.json").write_text(json.dumps({**state, "config": _plain(config)}))

    rng = random.Random(config.seed + state["batches"])
    buffer: list[tuple[Any, list[Any]]] = []
    budget = config.minutes * 60.0
    t_start, last_ckpt, wall0 = time.monotonic(), time.monotonic(), state["wall_s"]
    bar = tqdm(total=config.max_updates, initial=state["updates"], desc="distill", disable=not progress, mininterval=5.0)
    timesteps = None
    while state["updates"] < config.max_updates and wall0 + time.monotonic() - t_start < budget:
        # 1-2. a fresh relay-aware batch: host steps [0, k), then the guided teacher to the end
        prompts = sample_prompts(10**9 + config.seed * 10**6 + state["batches"], config.batch_size)
        reqs = [RelayRequest(p, relay_step=k, steps=n, guidance_scale=config.guidance_scale,
                             seed=10**7 + config.seed * 10**6 + state["batches"] * config.batch_size + i)
                for i, p in enumerate(prompts)]
        states = []
        for outcome in start_batch(host, reqs):
            if isinstance(outcome, Exception):  # only a request dropped by an on_step hook (none here) is an exception
                raise outcome
            states.append(outcome[0])
        timesteps = states[0].timesteps
        cond, _, points = _teacher_points(teacher, states, kept, config.guidance_scale)
        buffer.append((cond, points))
        buffer = buffer[-config.buffer_batches:]
        state["batches"] += 1
        jumps = jump_alphas(timesteps, indices, teacher.scheduler_config)
        # 3. student updates on batches from the replay buffer, every jump of the trajectory at once
        for _ in range(config.updates_per_batch):
            c, pts = buffer[-1] if _ == 0 else rng.choice(buffer)
            if lcm:
                assert target_net is not None
                loss = _lcm_loss(student, target_net, c, pts, timesteps, k, alphas, rng)
            else:
                x_in = torch.cat(pts[:-1])
                target = torch.cat(pts[1:])
                b = c.shape[0]
                t = torch.cat([torch.full((b,), jt) for jt, _, _ in jumps])
                a_t = torch.cat([torch.full((b, 1, 1, 1), at) for _, at, _ in jumps])
                a_s = torch.cat([torch.full((b, 1, 1, 1), as_) for _, _, as_ in jumps])
                eps = student(x_in, t, encoder_hidden_states=c.repeat(len(jumps), 1, 1)).sample
                loss = (ddim_jump(x_in, eps, a_t, a_s) - target).pow(2).mean()
            for g in opt.param_groups:
                g["lr"] = config.lr * min(1.0, (state["updates"] + 1) / config.warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                ema.step(params)
            if target_ema is not None and target_net is not None:
                target_ema.step(params)
                target_ema.copy_to([q for q in target_net.parameters()])
            state["updates"] += 1
            state["losses"].append(round(loss.item(), 6))
        bar.update(config.updates_per_batch)
        recent = state["losses"][-30:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
        if not math.isfinite(state["losses"][-1]):
            raise FloatingPointError(f"distillation loss became {state['losses'][-1]!r} at update {state['updates']}")
        state["wall_s"] = wall0 + time.monotonic() - t_start
        if time.monotonic() - last_ckpt > config.checkpoint_every_s:
            save_ckpt()
            last_ckpt = time.monotonic()
    bar.close()
    state["wall_s"] = wall0 + time.monotonic() - t_start
    save_ckpt()
    if ema is not None:
        ema.copy_to(params)
    out = root / config.subfolder
    shutil.rmtree(out, ignore_errors=True)
    student.eval().save_pretrained(out, safe_serialization=True)
    losses = state["losses"]
    chunk = max(1, len(losses) // 20)
    curve = [round(sum(losses[i:i + chunk]) / len(losses[i:i + chunk]), 6) for i in range(0, len(losses), chunk)]
    spec = StudentSpec(
        teacher=teacher_ref.variant, relay_step=k, steps=n, student_steps=len(indices), guidance_scale=float(config.guidance_scale),
        sampler="ddim", parametrization="lcm" if lcm else "eps",
        timestep_scaling=LCM_TIMESTEP_SCALING if lcm else None, sigma_data=LCM_SIGMA_DATA if lcm else None,
        method=config.method, coarse_timesteps=tuple(int(timesteps[i]) for i in indices) if timesteps is not None else (),
        teacher_unet_passes=2 * (n - k), student_unet_passes=len(indices),
        training={"updates": state["updates"], "batches": state["batches"], "trajectories": state["batches"] * config.batch_size,
                  "wall_s": round(state["wall_s"], 1), "loss_curve": curve,
                  "config": {**_plain(config), "family": Path(config.family).name}},  # the folder's name: no path of this machine
    )
    spec.write(out)
    info = spec.to_json()
    _add_variant(root, config.variant, config.subfolder)
    say(f"wrote {out} ({state['updates']} updates on {state['batches'] * config.batch_size} relayed trajectories)")
    return info


def _lcm_loss(student: Any, target_net: Any, cond: Any, points: list[Any], timesteps: Any, k: int, alphas: Any,
              rng: random.Random) -> Any:
    """Consistency loss on LCM_POINTS_PER_TRAJECTORY random points j of each guided teacher trajectory in ``points``.

    ``points[p]`` is the latent at grid step k + p (the last one the final latent). The online f at step j is
    pulled towards the target network's f at step j + 1 (the teacher's next DDIM point), or towards the final
    latent itself after the last step (the boundary f(x, 0) = x). Pseudo-Huber distance as LCM.
    """
    import torch

    from relaydiff.core.student import consistency_x0

    b, last = cond.shape[0], len(points) - 1
    picks = [rng.randrange(last) for _ in range(LCM_POINTS_PER_TRAJECTORY)]  # index p: from k + p to k + p + 1
    x = torch.cat([points[p] for p in picks])
    nxt = torch.cat([points[p + 1] for p in picks])
    c = cond.repeat(len(picks), 1, 1)

    def rows(values: list[float]) -> Any:
        return torch.cat([torch.full((b, 1, 1, 1), v) for v in values])

    t = [int(timesteps[k + p]) for p in picks]
    pred = consistency_x0(x, student(x, torch.tensor(t).repeat_interleave(b), encoder_hidden_states=c).sample,
                          rows([float(v) for v in t]), rows([float(alphas[v]) for v in t]), LCM_TIMESTEP_SCALING, LCM_SIGMA_DATA)
    with torch.no_grad():
        inner = [p + 1 < last for p in picks]  # the next point is a grid point (else it is the final latent)
        t_next = [int(timesteps[k + p + 1]) if ok else 0 for p, ok in zip(picks, inner, strict=True)]
        f_next = consistency_x0(nxt, target_net(nxt, torch.tensor(t_next).repeat_interleave(b), encoder_hidden_states=c).sample,
                                rows([float(v) for v in t_next]), rows([float(alphas[v]) for v in t_next]),
                                LCM_TIMESTEP_SCALING, LCM_SIGMA_DATA)
        boundary = rows([0.0 if ok else 1.0 for ok in inner])
        target = boundary * nxt + (1 - boundary) * f_next
    return (torch.sqrt((pred - target).pow(2) + LCM_HUBER_C**2) - LCM_HUBER_C).mean()


def _plain(config: DistillConfig) -> dict[str, Any]:
    return {kk: (str(v) if isinstance(v, Path) else v) for kk, v in asdict(config).items() if kk not in ("minutes", "max_updates", "threads")}


def _add_variant(root: Path, variant: str, subfolder: str) -> None:
    """Register the student in family.json (a plain pipeline folder gets a family.json)."""
    from relaydiff.core.family import FAMILY_FILE, FAMILY_FORMAT, family_info

    info = family_info(root) or {"format": FAMILY_FORMAT, "variants": {"host": "unet"}, "default_host": "host",
                                 "default_device": "host"}
    info.setdefault("variants", {})[variant] = subfolder
    (root / FAMILY_FILE).write_text(json.dumps(info, indent=1) + "\n")
