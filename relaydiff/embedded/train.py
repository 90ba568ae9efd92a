"""Train the embedded ``tinyshapes`` family on a CPU: VAE, text encoder, text encoder + host UNet, device UNet.

Data come from :func:`relaydiff.world.make_batch` on the fly (a fresh seed every step, nothing on
disk), from the world's **train split** only: validation and test captions (``relaydiff.world.splits``)
are never drawn. Every stage has a wall-clock budget and a step cap, whichever comes first; checkpoints
(safetensors + a JSON of the step) make every stage resumable. The output is a standard
diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads the host model) plus
``unet_device/`` and ``family.json``.

CLI: ``relaydiff family train --out DIR [--resume] [--resume-from FAMILY] [--recipe default|next]
[--device cpu|cuda] [--minutes-budget M] [--micro] [--seed S]``. At every checkpoint the output folder holds
the current (EMA) weights and a family.json with each stage's progress, so a copy of it (without
checkpoints/) is a snapshot that ``--resume-from`` continues from the weights alone.

The text stage (``--text-minutes M``, 5 by default; 0 skips it) pretrains the text encoder alone on parsing
each caption's scene (its colours, shapes, sizes, position, relations, background: labels the world grammar
gives for free) before the host stage, and ``--text-aux-weight W`` (0.1) keeps that loss on during the host
stage. Without them joint training collapses the position words and the host ignores where things go
(README). ``--device-kd-weight W`` (off) adds output distillation from the host to the device stage, and
``--device-max-timestep T`` (off) trains the device only on timesteps below T.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from relaydiff.embedded.models import FamilyArch, TextArch, UNetArch, VAEArch

if TYPE_CHECKING:
    import torch

FAMILY_FORMAT = "relaydiff-family/1"
STAGES = ("vae", "text", "host", "device")
# Seed index of each stage (fixed, so that adding a stage does not move the data seeds of the others).
_STAGE_SEED = {"vae": 0, "host": 1, "device": 2, "text": 3}
CHECKPOINT_DIR = "checkpoints"


@dataclass
class StageConfig:
    """Optimisation settings of one training stage."""

    minutes: float  # wall-clock budget; the stage stops at this or max_steps, whichever first
    max_steps: int  # step cap
    batch_size: int  # images per step
    lr: float  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up steps
    final_lr_fraction: float = 0.1  # cosine decay (over the budget) ends at lr * this
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.999  # EMA decay cap (with warm-up); 0 disables EMA


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in family.json."""

    name: str = "tinyshapes"  # family name
    seed: int = 0  # seeds weights, noise and data (make_batch seeds derive from it)
    arch: FamilyArch = field(default_factory=FamilyArch)  # model shapes
    vae: StageConfig = field(
        default_factory=lambda: StageConfig(minutes=27.0, max_steps=40_000, batch_size=16, lr=1.5e-3,
                                            warmup_steps=50, ema_decay=0.0)
    )  # stage (a): autoencoder
    host: StageConfig = field(
        default_factory=lambda: StageConfig(minutes=50.0, max_steps=100_000, batch_size=64, lr=1e-3,
                                            warmup_steps=200)
    )  # stage (b): text encoder + host UNet
    text: StageConfig = field(
        default_factory=lambda: StageConfig(minutes=5.0, max_steps=1_000, batch_size=256, lr=1e-3,
                                            warmup_steps=50, ema_decay=0.0)
    )  # stage (a'): text encoder alone on scene parsing (text_aux); 0 minutes: off
    device: StageConfig = field(
        default_factory=lambda: StageConfig(minutes=25.0, max_steps=100_000, batch_size=64, lr=1e-3,
                                            warmup_steps=200)
    )  # stage (c): device UNet, text encoder frozen
    kl_weight: float = 1e-5  # VAE KL weight (KL and reconstruction both summed per image)
    cfg_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # Min-SNR loss weighting gamma; 0 disables
    text_aux_weight: float = 0.1  # host stage: weight of the scene-parsing loss on the text encoder; 0: off
    device_kd_weight: float = 0.0  # device stage: weight of matching the host UNet's noise prediction; 0: off
    device_max_timestep: int = 0  # device stage: train only on timesteps below this (a relay finisher); 0: all
    n_objects_weights: tuple[float, float, float] = (0.35, 0.45, 0.2)  # P(1, 2, 3 objects) per step
    vae_object_weight: float = 0.0  # VAE stage: extra reconstruction weight on object pixels (dilated 1 px); 0: plain MSE
    torch_device: str = "cpu"  # "cpu" or "cuda": where every stage trains (nothing requires a GPU)
    threads: int = 2  # torch threads (the most, with tune_threads)
    tune_threads: bool = False  # time 1..threads every 100 steps and keep the fastest (for a shared CPU)
    checkpoint_every_s: float = 120.0  # seconds between checkpoints
    keep_checkpoints: bool = False  # keep out_dir/checkpoints after a finished run
    log_every: int = 10  # steps between progress-bar updates
    fp16_folders: tuple[str, ...] = ()  # folders saved as float16 (fp32 fits the 40 MB cap)

    @classmethod
    def micro(cls, seed: int = 0) -> "TrainConfig":
        """A seconds-long smoke run with tiny models."""
        arch = FamilyArch(
            vae=VAEArch(block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=4),
            text=TextArch(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2),
            host=UNetArch(block_out_channels=(16, 32), layers_per_block=1, attention_heads=2,
                          norm_num_groups=8),
            device=UNetArch(block_out_channels=(8, 16), layers_per_block=1, attention_heads=1,
                            norm_num_groups=4),
        )
        stage = StageConfig(minutes=1.0, max_steps=25, batch_size=8, lr=3e-3, warmup_steps=2,
                            ema_decay=0.9)
        return cls(seed=seed, arch=arch, vae=replace(stage, ema_decay=0.0), host=stage,
                   device=stage, text=replace(stage, minutes=0.0, ema_decay=0.0), text_aux_weight=0.0,
                   checkpoint_every_s=1e9,
                   log_every=5)

    @classmethod
    def recipe_next(cls, seed: int = 0) -> "TrainConfig":
        """The recipe the diagnosis of docs/family.md points to; run it in resumable pieces.

        Its stages are budgeted in **steps** (the minutes are only generous caps), so a run on a CPU shared
        with other jobs trains the same model, only later; the learning-rate schedule follows the steps.
        On an idle 2-core CPU (0.33 s per VAE step, 0.5 per text step, 0.9 per host step, 0.28 per device
        step) it takes about 7.1 hours. Against the default recipe: the VAE weights object pixels 10x
        (its round trips lost small diamonds, squares and triangles) over 5,000 steps; the host trains
        19,000 steps, not 3,341 (it had seen fewer steps than the device and placed objects worse), with a
        slower EMA; the device 23,000 steps; 3-object scenes are 35% of the steps, not 20%.
        """
        base = cls(seed=seed)
        return replace(
            base, name="tinyshapes-next", vae_object_weight=9.0, n_objects_weights=(0.25, 0.4, 0.35),
            vae=replace(base.vae, minutes=150.0, max_steps=5_000),
            text=replace(base.text, minutes=30.0, max_steps=600),
            host=replace(base.host, minutes=900.0, max_steps=19_000, ema_decay=0.9995),
            device=replace(base.device, minutes=400.0, max_steps=23_000),
        )

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scaled(self, minutes_budget: float) -> "TrainConfig":
        """The same config with the stage budgets rescaled to sum to ``minutes_budget``."""
        if not minutes_budget > 0:
            raise ValueError(f"minutes_budget must be > 0, got {minutes_budget!r}")
        total = sum(self.stage(s).minutes for s in STAGES)
        k = minutes_budget / total
        stages: dict[str, Any] = {s: replace(self.stage(s), minutes=self.stage(s).minutes * k) for s in STAGES}
        return replace(self, **stages)


# ----------------------------------------------------------------------------- data


def _data_seed(cfg: TrainConfig, stage: str, step: int) -> int:
    """A make_batch seed unique to (run seed, stage, step), far from small evaluation seeds."""
    return (1 + cfg.seed) * 2**40 + (1 + _STAGE_SEED[stage]) * 2**32 + step


def _batch(cfg: TrainConfig, stage: str, step: int, n: int) -> tuple["torch.Tensor", list[str]]:
    """Images in [-1, 1] (n, 3, H, W) and their captions for one step."""
    import numpy as np
    import torch
    from relaydiff.world import make_batch

    seed = _data_seed(cfg, stage, step)
    rng = np.random.default_rng(seed)
    w = np.asarray(cfg.n_objects_weights, dtype=float)
    k = int(rng.choice(len(w), p=w / w.sum())) + 1
    images, captions, _ = make_batch(seed, n, size=cfg.arch.resolution, n_objects=k, split="train")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, list(captions)


# ----------------------------------------------------------------------------- stage loop


@dataclass
class _StageResult:
    steps: int  # optimizer steps taken in total
    samples: int  # images seen in total
    wall_s: float  # training seconds, summed over resumes
    stop_reason: str  # "max_steps" or "time_budget"
    losses: list[float]  # per-step training loss of this process's steps (for the report)
    curve: list[float]  # loss averaged over up to 20 equal chunks of all steps (kept across resumes)
    extra: dict[str, float]  # stage-specific figures


class _ThreadTuner:
    """Pick 1..max torch threads by timing probes, since other jobs share this CPU.

    With a busy neighbour, a 2-thread step can be 5x slower than a 1-thread one (each
    parallel region waits for a descheduled thread); idle, 2 threads are ~2x faster. Every
    ``period`` steps each thread count is timed on ``probe`` steps and the faster one is kept.
    """

    def __init__(self, max_threads: int, period: int = 100, probe: int = 4) -> None:
        self.options = list(range(1, max_threads + 1)) if max_threads > 1 else [1]
        self.period, self.probe = period, probe
        self.times: dict[int, list[float]] = {}
        self.best = max_threads

    def threads_for(self, step: int) -> int:
        phase = step % self.period
        if len(self.options) > 1 and phase < self.probe * len(self.options):
            return self.options[phase // self.probe]
        return self.best

    def record(self, step: int, threads: int, seconds: float) -> None:
        phase = step % self.period
        if len(self.options) < 2 or phase >= self.probe * len(self.options):
            return
        if phase == 0:
            self.times = {}
        self.times.setdefault(threads, []).append(seconds)
        if phase == self.probe * len(self.options) - 1:  # skip each probe's first (warm-up) step
            self.best = min(self.times, key=lambda k: sorted(self.times[k][1:])[len(self.times[k][1:]) // 2])


def _lr_factor(sc: StageConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, sc.warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * (sc.final_lr_fraction + (1 - sc.final_lr_fraction) * cos)


def _save_tensors(path: Path, tensors: dict[str, "torch.Tensor"]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _run_stage(
    cfg: TrainConfig,
    stage: str,
    modules: dict[str, "torch.nn.Module"],
    loss_fn: Callable[[int], tuple["torch.Tensor", dict[str, float]]],
    ckpt_dir: Path,
    resume: bool,
    start: dict[str, Any] | None = None,
    snapshot: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[_StageResult, Any]:
    """Optimise ``modules`` with ``loss_fn(step)`` until the stage's budget; return result and EMA.

    Checkpoints hold module weights, EMA shadows (safetensors), the optimizer state
    (``torch.save``, read back with ``weights_only=True``) and ``state.json``.

    Args:
        start: where a stage resumed from committed weights alone begins (``steps``, ``samples_seen``,
            ``wall_s`` of its progress record; the modules already hold those weights) when there is no
            checkpoint: a fresh optimizer, warmed up again over ``warmup_steps``, continues the step count,
            data seeds and learning-rate schedule.
        snapshot: called after every checkpoint with the stage's progress record, with the EMA weights
            (if any) swapped into the modules, to write the family folder's current state.
    """
    import torch
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    sc = cfg.stage(stage)
    for m in modules.values():
        m.to(cfg.torch_device)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.weight_decay, betas=(0.9, 0.99))
    ema = EMAModel(params, decay=sc.ema_decay, use_ema_warmup=True, power=0.75) if sc.ema_decay else None
    state: dict[str, Any] = {"step": 0, "samples": 0, "wall_s": 0.0, "chunks": [], "seed": cfg.seed}
    d = ckpt_dir / stage
    if start is not None and not (resume and (d / "state.json").is_file()):
        state.update(step=int(start["steps"]), samples=int(start["samples_seen"]), wall_s=float(start["wall_s"]),
                     chunks=list(start.get("loss_curve", [])), warm_from=int(start["steps"]))
    elif resume and (d / "state.json").is_file():
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "weights.safetensors"))
        for name, m in modules.items():
            m.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items()
                               if k.startswith(name + ".")})
        opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        if ema is not None:
            shadow = load_file(str(d / "ema.safetensors"))
            ema.shadow_params = [shadow[str(i)].to(cfg.torch_device) for i in range(len(params))]
            ema.optimization_step = state["step"]

    def progress() -> dict[str, Any]:
        return {"steps": state["step"], "samples_seen": state["samples"], "wall_s": round(state["wall_s"], 1),
                "loss_curve": _curve(state["chunks"]), "partial": True}

    def save() -> None:
        d.mkdir(parents=True, exist_ok=True)
        _save_tensors(d / "weights.safetensors",
                      {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()})
        torch.save(opt.state_dict(), d / "optimizer.pt")
        if ema is not None:
            _save_tensors(d / "ema.safetensors", {str(i): p for i, p in enumerate(ema.shadow_params)})
        (d / "state.json").write_text(json.dumps(state, indent=1))
        if snapshot is not None:
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
            snapshot(progress())
            if ema is not None:
                ema.restore(params)

    step0, wall0 = state["step"], state["wall_s"]
    budget_s = sc.minutes * 60.0
    losses: list[float] = []
    extras: dict[str, list[float]] = {}
    t_start = last_ckpt = time.monotonic()
    stop = "max_steps"
    for m in modules.values():
        m.train()
    bar = tqdm(total=sc.max_steps, initial=step0, desc=f"{cfg.name}:{stage}", mininterval=5.0,
               dynamic_ncols=True)
    step = step0
    tuner = _ThreadTuner(cfg.threads if cfg.tune_threads else 1)
    if not cfg.tune_threads:
        tuner.best = cfg.threads
    while step < sc.max_steps:
        n_threads = tuner.threads_for(step)
        torch.set_num_threads(n_threads)
        t_step = time.monotonic()
        wall = wall0 + time.monotonic() - t_start
        if wall >= budget_s:
            stop = "time_budget"
            break
        torch.manual_seed(_data_seed(cfg, stage, step))
        for g in opt.param_groups:
            g["lr"] = sc.lr * _lr_factor(sc, step - state.get("warm_from", 0), max(wall / budget_s, step / sc.max_steps))
        loss, extra = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sc.grad_clip)
        opt.step()
        if ema is not None:
            ema.step(params)
        tuner.record(step, n_threads, time.monotonic() - t_step)
        step += 1
        losses.append(loss.item())
        for k, v in extra.items():
            extras.setdefault(k, []).append(v)
        state["chunks"].append(losses[-1])
        if step % cfg.log_every == 0:
            recent = losses[-cfg.log_every * 5 :]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}",
                            threads=tuner.best, refresh=False)
            bar.update(step - bar.n)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"stage {stage!r}: loss became {losses[-1]!r} at step {step}")
        state.update(step=step, samples=state["samples"] + sc.batch_size,
                     wall_s=wall0 + time.monotonic() - t_start)
        if time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
            _compress_chunks(state)
            save()
            last_ckpt = time.monotonic()
    bar.update(step - bar.n)
    bar.close()
    state["wall_s"] = wall0 + time.monotonic() - t_start
    _compress_chunks(state)
    state["stop_reason"] = stop
    save()
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    extra_means = {k: sum(v[-len(tail):]) / len(v[-len(tail):]) for k, v in extras.items()}
    extra_means["loss_final"] = sum(tail) / len(tail)
    res = _StageResult(steps=step, samples=state["samples"], wall_s=state["wall_s"], stop_reason=stop,
                       losses=losses, curve=_curve(state["chunks"]), extra=extra_means)
    return res, ema


def _compress_chunks(state: dict[str, Any]) -> None:
    """Keep the per-step loss list bounded (pairs averaged once it exceeds 4000 entries)."""
    c = state["chunks"]
    while len(c) > 4000:
        c = [(a + b) / 2 for a, b in zip(c[::2], c[1::2])]
    state["chunks"] = c


def _curve(values: Sequence[float], n: int = 20) -> list[float]:
    if not values:
        return []
    k = max(1, math.ceil(len(values) / n))
    return [round(sum(values[i : i + k]) / len(values[i : i + k]), 5) for i in range(0, len(values), k)]


def _stage_done(ckpt_dir: Path, stage: str, sc: StageConfig) -> bool:
    """True when the stage's checkpoint finished and already covers ``sc``'s budget."""
    p = ckpt_dir / stage / "state.json"
    if not p.is_file():
        return False
    state = json.loads(p.read_text())
    if "stop_reason" not in state:
        return False
    return state["step"] >= sc.max_steps or state["wall_s"] >= sc.minutes * 60.0 - 1.0


def _reopen_stage(ckpt_dir: Path, stage: str) -> None:
    """Mark a finished stage's checkpoint as unfinished so a larger budget continues it."""
    p = ckpt_dir / stage / "state.json"
    if p.is_file():
        state = json.loads(p.read_text())
        state.pop("stop_reason", None)
        p.write_text(json.dumps(state, indent=1))


@dataclass
class _Resume:
    """How one stage starts, and where its snapshots go."""

    start: dict[str, Any] | None  # the stage's record in a committed family.json (weights in the folder); None: fresh
    write_progress: Callable[[str, dict[str, Any]], None]  # (stage, record): rewrite family.json with progress


def _snapshot(rs: _Resume, stage: str, write: Callable[[], None]) -> Callable[[dict[str, Any]], None]:
    def snap(record: dict[str, Any]) -> None:
        write()
        rs.write_progress(stage, record)

    return snap


def object_weights(x: "torch.Tensor", weight: float) -> "torch.Tensor":
    """Per-pixel reconstruction weights (n, 1, H, W): ``1 + weight`` on object pixels and 1 px around them, 1 on
    the background. Objects are pixels that differ from the corner pixel (the background colour) by more than
    0.05 summed over RGB in [-1, 1] units. Written here: a plain MSE lets a 25-pixel small diamond cost as little
    as a handful of background pixels, and the round trips lost exactly those shapes (docs/family.md)."""
    import torch

    bg = x[:, :, :1, :1]
    mask = ((x - bg).abs().sum(dim=1, keepdim=True) > 0.05).float()
    mask = torch.nn.functional.max_pool2d(mask, kernel_size=3, stride=1, padding=1)
    return 1.0 + weight * mask


# ----------------------------------------------------------------------------- stages


def _train_vae(cfg: TrainConfig, out: Path, ckpt: Path, resume: bool, rs: _Resume) -> dict[str, Any]:
    import torch
    from relaydiff.embedded.models import build_vae

    vae = build_vae(cfg.arch)
    if rs.start is not None:
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(str(out / "vae")).state_dict())

    dev = cfg.torch_device

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = _batch(cfg, "vae", step, cfg.vae.batch_size)[0].to(dev)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        sq = (rec - x).pow(2)
        mse = sq.mean()
        rec_loss = (object_weights(x, cfg.vae_object_weight) * sq).mean() if cfg.vae_object_weight > 0 else mse
        kl = post.kl().mean() / x[0].numel()  # per-image KL sum, normalised like the mean MSE
        return rec_loss + cfg.kl_weight * kl, {"mse": mse.item(), "kl": kl.item() * x[0].numel()}

    snap = _snapshot(rs, "vae", lambda: vae.save_pretrained(out / "vae", safe_serialization=True))
    res, _ = _run_stage(cfg, "vae", {"vae": vae}, loss_fn, ckpt, resume, start=rs.start, snapshot=snap)
    vae.eval()
    with torch.no_grad():  # scaling_factor = 1 / std of the posterior samples (as in SD)
        lat = torch.cat([vae.encode(_batch(cfg, "vae", 10**6 + i, 64)[0].to(dev)).latent_dist.sample()
                         for i in range(4)])
        x = _batch(cfg, "vae", 10**6 + 99, 64)[0].to(dev)
        rec_mse = float((vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) - x).pow(2).mean())
    vae.to("cpu")  # type: ignore[arg-type]  # diffusers wraps ModelMixin.to in functools.wraps(nn.Module.to): mypy reads it unbound
    std, mean = float(lat.std()), float(lat.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return {**_report(res), "latent_std": std, "latent_mean": mean, "scaling_factor": 1.0 / std,
            "eval_recon_mse": rec_mse}


def _report(res: _StageResult) -> dict[str, Any]:
    return {"steps": res.steps, "samples_seen": res.samples, "wall_s": round(res.wall_s, 1),
            "stop_reason": res.stop_reason, "loss_curve": res.curve,
            **{k: round(v, 6) for k, v in res.extra.items()}}


def _diffusion_loss_fn(
    cfg: TrainConfig, stage: str, unet: "torch.nn.Module", text_encoder: "torch.nn.Module",
    tokenizer: Any, vae: Any, train_text: bool, teacher: "torch.nn.Module | None" = None,
    kd_weight: float = 0.0, max_timestep: int = 0,
) -> Callable[[int], tuple["torch.Tensor", dict[str, float]]]:
    """Epsilon-prediction loss (Ho et al. eq. 14) with Min-SNR-gamma weighting (Hang et al. 2023).

    With a ``teacher`` UNet, ``kd_weight`` times the same weighted squared distance to the teacher's
    prediction on the same noisy latent is added: the output-level knowledge distillation of BK-SDM
    (Kim et al. 2023), which hands the small UNet the large one's denoising path in the shared latent.
    ``max_timestep`` > 0 samples timesteps below it only (a model that only ever finishes relays).
    """
    import torch
    from relaydiff.embedded.models import build_scheduler

    dev = cfg.torch_device
    sched = build_scheduler()
    ac = sched.alphas_cumprod
    snr_all = (ac / (1 - ac)).to(dev)
    sf = vae.config["scaling_factor"]
    n_train = sched.config["num_train_timesteps"]
    t_hi = max_timestep if 0 < max_timestep < n_train else n_train
    bs = cfg.stage(stage).batch_size

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x, captions = _batch(cfg, stage, step, bs)
        x = x.to(dev)
        drop = torch.rand(bs) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(dev)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample() * sf
        with torch.set_grad_enabled(train_text):
            ctx = text_encoder(ids)[0]
        noise = torch.randn_like(z0)
        t = torch.randint(0, t_hi, (bs,)).to(dev)
        zt = sched.add_noise(z0, noise, t)  # type: ignore[arg-type]  # diffusers annotates timesteps as IntTensor; 1. forward process q(z_t | z_0)
        eps = unet(zt, t, encoder_hidden_states=ctx).sample  # 2. predict the noise
        per = (eps - noise).pow(2).mean(dim=(1, 2, 3))  # 3. ||eps - eps_theta||^2
        if cfg.snr_gamma > 0:  # 4. Min-SNR weights min(SNR, gamma) / SNR
            snr = snr_all[t]
            w = torch.clamp(snr, max=cfg.snr_gamma) / snr
        else:
            w = torch.ones(bs, device=dev)
        loss = (w * per).mean()
        extra = {"mse": per.mean().item()}
        if teacher is not None and kd_weight > 0:  # 5. ||eps_teacher - eps_theta||^2
            with torch.no_grad():
                eps_t = teacher(zt, t, encoder_hidden_states=ctx).sample
            kd = (eps - eps_t).pow(2).mean(dim=(1, 2, 3))
            loss = loss + kd_weight * (w * kd).mean()
            extra["kd_mse"] = kd.mean().item()
        return loss, extra

    return loss_fn


TEXT_PRETRAINED = "checkpoints/text_encoder_pretrained"  # where the text stage leaves its encoder (and head)
SCENE_HEAD = "scene_head.safetensors"  # the scene-parsing head, saved beside its text encoder


def scene_targets(prompts: Sequence[str]) -> "torch.Tensor":
    """Class indices (n, 13) of each caption's scene, parsed by the world grammar: for objects 0-2 colour,
    shape and size, then the position, relations 0-1 and the background; 0 means absent."""
    import torch

    from relaydiff.world import BACKGROUNDS, PALETTE, POSITIONS, RELATIONS, SHAPES, SIZES, parse_prompt

    colours, sizes, bgs = list(PALETTE), list(SIZES), list(BACKGROUNDS)
    rows = []
    for prompt in prompts:
        spec = parse_prompt(prompt)
        row = []
        for i in range(3):
            o = spec.objects[i] if i < len(spec.objects) else None
            row += [0, 0, 0] if o is None else [1 + colours.index(o.colour), 1 + SHAPES.index(o.shape), 1 + sizes.index(o.size)]
        row.append(0 if spec.position is None else 1 + POSITIONS.index(spec.position))
        for j in range(2):
            r = spec.relations[j] if j < len(spec.relations) else None
            row.append(0 if r is None else 1 + RELATIONS.index(r.relation))
        row.append(0 if spec.background is None else 1 + bgs.index(spec.background))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def scene_classes() -> list[int]:
    """Number of classes (absent included) of each column of :func:`scene_targets`."""
    from relaydiff.world import BACKGROUNDS, PALETTE, POSITIONS, RELATIONS, SHAPES, SIZES

    obj = [1 + len(PALETTE), 1 + len(SHAPES), 1 + len(SIZES)]
    return obj * 3 + [1 + len(POSITIONS)] + [1 + len(RELATIONS)] * 2 + [1 + len(BACKGROUNDS)]


def scene_head(hidden: int) -> "torch.nn.Module":
    """Linear classifiers of the scene columns on the mean of the text encoder's hidden states (every
    padded position, as the UNet's cross-attention sees them)."""
    import torch

    return torch.nn.Linear(hidden, sum(scene_classes()))


def _text_aux_loss_fn(cfg: TrainConfig, stage: str, text_encoder: Any, head: Any, tokenizer: Any,
                      ) -> Callable[[int], tuple["torch.Tensor", dict[str, float]]]:
    """Cross-entropy of parsing each caption's scene from the text encoder's output (written here: the world's
    grammar gives the labels for free, and no library has this task). The UNet conditions on every token, so
    words it must follow (positions!) have to move the hidden states: this loss makes them."""
    import torch

    from relaydiff.world import sample_prompts

    sizes = scene_classes()
    n = 64 if stage != "text" else cfg.text.batch_size

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        prompts = sample_prompts(_data_seed(cfg, "text", step) if stage == "text" else _data_seed(cfg, stage, step) + 2**31, n,
                                 split="train")
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(cfg.torch_device)
        logits = head(text_encoder(ids)[0].mean(dim=1)).split(sizes, dim=1)
        y = scene_targets(prompts).to(cfg.torch_device)
        losses = [torch.nn.functional.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits)]
        right = [float((lg.argmax(1) == y[:, i]).float().mean()) for i, lg in enumerate(logits)]
        return sum(losses[1:], losses[0]) / len(losses), {"parse_acc": sum(right) / len(right), "position_acc": right[9]}

    return loss_fn


def _save_text(text: Any, head: Any, folder: Path) -> None:
    text.save_pretrained(folder, safe_serialization=True)
    _save_tensors(folder / SCENE_HEAD, head.state_dict())


def _load_text(folder: Path, head: Any) -> Any:
    """The CLIP text encoder saved in ``folder``; loads the scene head beside it into ``head`` when present."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    if (folder / SCENE_HEAD).is_file():
        head.load_state_dict(load_file(str(folder / SCENE_HEAD)))
    return CLIPTextModel.from_pretrained(str(folder))


def _train_text(cfg: TrainConfig, out: Path, ckpt: Path, resume: bool, rs: _Resume) -> dict[str, Any]:
    """Stage (a'): the text encoder alone, on scene parsing; the host stage starts from it."""
    tok, text = _load_tokenizer_and_text(cfg, out)
    head = scene_head(text.config.hidden_size)
    if rs.start is not None:
        text = _load_text(out / "text_encoder", head)
    snap = _snapshot(rs, "text", lambda: _save_text(text, head, out / "text_encoder"))
    res, _ = _run_stage(cfg, "text", {"text_encoder": text, "scene_head": head},
                        _text_aux_loss_fn(cfg, "text", text, head, tok), ckpt, resume, start=rs.start, snapshot=snap)
    text.to("cpu")
    head.to("cpu")
    _save_text(text, head, out / TEXT_PRETRAINED)
    _save_text(text, head, out / "text_encoder")  # the committed copy (the host stage overwrites it)
    return _report(res)


def _load_tokenizer_and_text(cfg: TrainConfig, out: Path) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    from relaydiff.embedded.models import build_text_encoder

    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    return tok, build_text_encoder(cfg.arch, tok)


def _train_host(cfg: TrainConfig, out: Path, ckpt: Path, resume: bool, rs: _Resume) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from relaydiff.embedded.models import build_unet

    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval().requires_grad_(False).to(cfg.torch_device)
    tok, text = _load_tokenizer_and_text(cfg, out)
    head = scene_head(text.config.hidden_size)
    unet = build_unet(cfg.arch, cfg.arch.host)
    if rs.start is not None:  # committed weights of a partial host stage: its UNet and jointly trained encoder
        from diffusers import UNet2DConditionModel

        text = _load_text(out / "text_encoder", head)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(out / "unet")).state_dict())
    elif cfg.text.minutes > 0:  # start from the text stage's encoder
        text = _load_text(out / TEXT_PRETRAINED if (out / TEXT_PRETRAINED).is_dir() else out / "text_encoder", head)
    loss_fn = _diffusion_loss_fn(cfg, "host", unet, text, tok, vae, train_text=True)
    modules = {"unet": unet, "text_encoder": text}

    def write() -> None:
        unet.save_pretrained(out / "unet", safe_serialization=True)
        _save_text(text, head, out / "text_encoder")

    if cfg.text_aux_weight > 0:
        aux = _text_aux_loss_fn(cfg, "host", text, head, tok)
        diffusion = loss_fn

        def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            loss, extra = diffusion(step)
            a, a_extra = aux(step)
            return loss + cfg.text_aux_weight * a, {**extra, **{f"aux_{k}": v for k, v in a_extra.items()}}

        modules["scene_head"] = head
    res, ema = _run_stage(cfg, "host", modules, loss_fn, ckpt, resume, start=rs.start,
                          snapshot=_snapshot(rs, "host", write))
    if ema is not None:
        ema.copy_to([p for m in modules.values() for p in m.parameters() if p.requires_grad])
    for m in modules.values():
        m.to("cpu")
    write()
    return _report(res)


def _train_device(cfg: TrainConfig, out: Path, ckpt: Path, resume: bool, rs: _Resume) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from relaydiff.embedded.models import build_unet

    dev = cfg.torch_device
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval().requires_grad_(False).to(dev)
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    text = CLIPTextModel.from_pretrained(str(out / "text_encoder")).eval().requires_grad_(False).to(dev)
    unet = build_unet(cfg.arch, cfg.arch.device)
    if rs.start is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(out / "unet_device")).state_dict())
    teacher = None
    if cfg.device_kd_weight > 0:
        teacher = UNet2DConditionModel.from_pretrained(str(out / "unet")).eval().requires_grad_(False).to(dev)
    loss_fn = _diffusion_loss_fn(cfg, "device", unet, text, tok, vae, train_text=False, teacher=teacher,
                                 kd_weight=cfg.device_kd_weight, max_timestep=cfg.device_max_timestep)
    snap = _snapshot(rs, "device", lambda: unet.save_pretrained(out / "unet_device", safe_serialization=True))
    res, ema = _run_stage(cfg, "device", {"unet": unet}, loss_fn, ckpt, resume, start=rs.start, snapshot=snap)
    if ema is not None:
        ema.copy_to(list(unet.parameters()))
    unet.to("cpu").save_pretrained(out / "unet_device", safe_serialization=True)  # type: ignore[arg-type]  # as vae.to above
    return _report(res)


# ----------------------------------------------------------------------------- family folder


def _write_index(out: Path) -> None:
    import diffusers

    from relaydiff.embedded.models import build_scheduler

    from diffusers import DDIMScheduler

    DDIMScheduler.from_config(
        build_scheduler().config, set_alpha_to_one=False, steps_offset=1, clip_sample=False
    ).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _store_fp16(out: Path, folders: Sequence[str]) -> None:
    """Re-save the diffusers model in each of ``folders`` with float16 weights (loads back as fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    for name in folders:
        if name not in ("unet", "unet_device"):
            raise ValueError(f"fp16 storage supports 'unet' and 'unet_device', got {name!r}")
        model = UNet2DConditionModel.from_pretrained(str(out / name))
        model.to(torch.float16).save_pretrained(out / name, safe_serialization=True)


def _weight_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*/*.safetensors") if p.parent.name != CHECKPOINT_DIR)


def _measure(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from relaydiff.embedded.models import count_params, unet_flops

    host = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    dev = UNet2DConditionModel.from_pretrained(str(out / "unet_device"))
    fh, fd = unet_flops(cfg.arch, host), unet_flops(cfg.arch, dev)
    return {
        "params": {
            "unet": count_params(host),
            "unet_device": count_params(dev),
            "vae": count_params(AutoencoderKL.from_pretrained(str(out / "vae"))),
            "text_encoder": count_params(CLIPTextModel.from_pretrained(str(out / "text_encoder"))),
        },
        "flops_per_step": {"unet": fh, "unet_device": fd},
        "flops_ratio_device_over_host": round(fd / fh, 4),
    }


def _check_captions_fit(cfg: TrainConfig, tok: Any) -> int:
    """Longest tokenised caption over a sample of 3-object captions; raise if it would be cut."""
    from relaydiff.world import make_batch

    _, caps, _ = make_batch(12345, 256, size=cfg.arch.resolution, n_objects=3)
    longest = max(len(tok(c).input_ids) for c in caps)
    if longest > tok.model_max_length:
        raise ValueError(
            f"captions need {longest} tokens but max_position_embeddings is {tok.model_max_length!r}"
        )
    return longest


COMMITTED_FOLDERS = ("vae", "text_encoder", "unet", "unet_device")  # weights --resume-from carries over


def _family_record(cfg: TrainConfig, reports: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "format": FAMILY_FORMAT,
        "name": cfg.name,
        "variants": {"host": "unet", "device": "unet_device"},
        "default_host": "host",
        "default_device": "device",
        "resolution": cfg.arch.resolution,
        "training": {
            "config": cfg.to_dict(),
            **extra,
            "stages": reports,
            "total_wall_s": round(sum(r["wall_s"] for r in reports.values()), 1),
            "torch_version": torch.__version__,
        },
    }


def read_progress(folder: str | Path, cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The per-stage progress records of a family folder's family.json (what ``--resume-from`` continues).

    Raises:
        ValueError: if the folder has no readable family.json of this format, or was trained with another
            architecture than ``cfg``'s (its weights would not load).
    """
    path = Path(folder) / "family.json"
    try:
        family = json.loads(path.read_text())
        stages = family["training"]["stages"]
        arch = family["training"]["config"]["arch"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume-from {str(folder)!r}: no family.json with training progress ({exc})") from None
    if family.get("format") != FAMILY_FORMAT:
        raise ValueError(f"--resume-from {str(folder)!r}: format {family.get('format')!r}, expected {FAMILY_FORMAT!r}")
    if json.loads(json.dumps(cfg.arch.to_dict())) != arch:
        raise ValueError(f"--resume-from {str(folder)!r}: trained with architecture {arch!r}, this run has "
                         f"{cfg.arch.to_dict()!r} (pick the same --recipe)")
    return {k: v for k, v in stages.items() if k in STAGES}


def _covers(record: dict[str, Any], sc: StageConfig) -> bool:
    """A finished stage record whose steps or time already cover ``sc``'s budget."""
    return not record.get("partial") and (record["steps"] >= sc.max_steps or record["wall_s"] >= sc.minutes * 60.0 - 1.0)


def train_family(cfg: TrainConfig, out_dir: str | Path, resume: bool = True,
                 resume_from: str | Path | None = None) -> Path:
    """Train every stage (or resume them) and write the family folder ``out_dir``.

    At every checkpoint the folder's weights and family.json are rewritten with the current (EMA) state and
    each stage's progress (``"partial": true`` while it runs), so a copy of the folder without checkpoints/
    is a resumable snapshot.

    Args:
        cfg: the run's configuration.
        out_dir: output folder; gets model_index.json, vae/, text_encoder/, tokenizer/,
            scheduler/, unet/, unet_device/ and family.json (checkpoints under checkpoints/).
        resume: continue from checkpoints found in ``out_dir``; False restarts every stage.
        resume_from: a family folder (a committed snapshot) to continue from its weights and family.json
            alone: finished stages are kept, a partial one continues its step count with a fresh optimizer.
            Checkpoints in ``out_dir`` take precedence.
    Returns:
        ``out_dir`` as a Path.
    Raises:
        ValueError: on a ``resume_from`` folder that is not a family trained with ``cfg.arch``.
    """
    import torch

    from relaydiff.embedded.tokenizer import build_tokenizer
    from relaydiff.world import vocabulary

    out = Path(out_dir)
    committed = read_progress(resume_from, cfg) if resume_from is not None else {}
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None and Path(resume_from).resolve() != out.resolve():
        for name in COMMITTED_FOLDERS:
            if (Path(resume_from) / name).is_dir():
                shutil.copytree(Path(resume_from) / name, out / name, dirs_exist_ok=True)
    ckpt = out / CHECKPOINT_DIR
    if not resume and ckpt.exists():
        shutil.rmtree(ckpt)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    tok = build_tokenizer(vocabulary(), out / "tokenizer", cfg.arch.text.max_position_embeddings)
    longest = _check_captions_fit(cfg, tok)
    _write_index(out)
    reports_path = ckpt / "reports.json"
    reports: dict[str, Any] = json.loads(reports_path.read_text()) if resume and reports_path.is_file() else {}

    def write_progress(stage: str, record: dict[str, Any]) -> None:
        family = _family_record(cfg, {**reports, stage: record}, {"complete": False})
        (out / "family.json").write_text(json.dumps(family, indent=1) + "\n")

    trainers = {"vae": _train_vae, "text": _train_text, "host": _train_host, "device": _train_device}
    rerun = False  # once a stage (re)trains, every later stage depends on new weights
    for stage in STAGES:
        sc = cfg.stage(stage)
        if sc.minutes <= 0:  # an optional stage that is off
            continue
        if resume and not rerun and stage in reports and _stage_done(ckpt, stage, sc):
            continue
        record = None if rerun else committed.get(stage)
        has_ckpt = resume and (ckpt / stage / "state.json").is_file()
        if record is not None and _covers(record, sc) and not has_ckpt:
            reports[stage] = record  # finished in the committed snapshot
            continue
        if rerun:
            shutil.rmtree(ckpt / stage, ignore_errors=True)
        else:
            _reopen_stage(ckpt, stage)  # a larger budget than the finished run's continues it
        rerun = True
        torch.manual_seed(cfg.seed + _STAGE_SEED[stage])
        if record is not None:
            record = {**record, "partial": True}
        reports[stage] = trainers[stage](cfg, out, ckpt, resume, _Resume(record, write_progress))
        ckpt.mkdir(parents=True, exist_ok=True)
        reports_path.write_text(json.dumps(reports, indent=1))
        write_progress(stage, reports[stage])  # the finished stage, before the next one's first snapshot
    _store_fp16(out, cfg.fp16_folders)
    measured = _measure(cfg, out)
    measured["weights_bytes"] = _weight_bytes(out)
    family = _family_record(cfg, reports, {**measured, "complete": True, "longest_caption_tokens": longest,
                                           "this_process_wall_s": round(time.monotonic() - t0, 1)})
    (out / "family.json").write_text(json.dumps(family, indent=1) + "\n")
    print(f"host UNet {measured['params']['unet']:,} params, {measured['flops_per_step']['unet']:,} FLOPs/step; "
          f"device UNet {measured['params']['unet_device']:,} params, "
          f"{measured['flops_per_step']['unet_device']:,} FLOPs/step "
          f"(ratio {measured['flops_ratio_device_over_host']})")
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI for ``relaydiff family train`` (``argv`` are the arguments after ``family train``)."""
    p = argparse.ArgumentParser(prog="relaydiff family train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="family folder to write")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from checkpoints in --out (default: on)")
    p.add_argument("--minutes-budget", type=float, default=None,
                   help="total wall-clock minutes, split over the stages in the default proportions")
    for stage in STAGES:
        p.add_argument(f"--{stage}-minutes", type=float, default=None,
                       help=f"wall-clock minutes of stage {stage!r} (after --minutes-budget); a larger "
                       "value than a finished run's continues that stage on --resume")
    p.add_argument("--text-aux-weight", type=float, default=None,
                   help="host stage: weight of the scene-parsing loss on the text encoder (default 0.1; 0: off; "
                        "with --text-minutes the text encoder is pretrained on that loss first)")
    p.add_argument("--device-kd-weight", type=float, default=None,
                   help="device stage: weight of matching the host UNet's noise prediction on the same "
                        "noisy latent (output distillation; default 0: off)")
    p.add_argument("--device-max-timestep", type=int, default=None,
                   help="device stage: train on timesteps below T only, a model that only finishes relays "
                        "(default 0: all)")
    p.add_argument("--micro", action="store_true", help="seconds-long smoke run with tiny models")
    p.add_argument("--recipe", choices=("default", "next"), default="default",
                   help="default: the committed tinyshapes recipe; next: the recipe of docs/family.md "
                        "(object-weighted VAE, 19k-step host, 23k-step device; budgets in steps)")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="continue from a family folder's weights and family.json alone (e.g. a committed "
                        "snapshot): finished stages are kept, a partial stage continues")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="run seed")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints/ after the run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    p.add_argument("--tune-threads", action="store_true",
                   help="re-time 1..threads every 100 steps and keep the faster (when other jobs share the CPU)")
    args = p.parse_args(argv)
    # Threads that sleep instead of spinning at barriers: the CPU is shared with other jobs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # silence the per-load "install accelerate" notice
    if args.micro:
        cfg = TrainConfig.micro(seed=args.seed)
    else:
        cfg = TrainConfig.recipe_next(seed=args.seed) if args.recipe == "next" else TrainConfig(seed=args.seed)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here")
    cfg = replace(cfg, torch_device=args.device)
    if args.minutes_budget is not None:
        cfg = cfg.scaled(args.minutes_budget)
    for stage in STAGES:
        minutes = getattr(args, f"{stage}_minutes")
        if minutes is not None:
            if not minutes > 0:
                p.error(f"--{stage}-minutes must be > 0, got {minutes!r}")
            rescaled: dict[str, Any] = {stage: replace(cfg.stage(stage), minutes=minutes)}
            cfg = replace(cfg, **rescaled)
    if args.text_aux_weight is not None:
        if not args.text_aux_weight >= 0:
            p.error(f"--text-aux-weight must be >= 0, got {args.text_aux_weight!r}")
        cfg = replace(cfg, text_aux_weight=args.text_aux_weight)
    if args.device_kd_weight is not None:
        if not args.device_kd_weight >= 0:
            p.error(f"--device-kd-weight must be >= 0, got {args.device_kd_weight!r}")
        cfg = replace(cfg, device_kd_weight=args.device_kd_weight)
    if args.device_max_timestep is not None:
        if not 0 <= args.device_max_timestep <= 1000:
            p.error(f"--device-max-timestep must be in 0..1000, got {args.device_max_timestep!r}")
        cfg = replace(cfg, device_max_timestep=args.device_max_timestep)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads!r}")
    cfg = replace(cfg, keep_checkpoints=args.keep_checkpoints, tune_threads=args.tune_threads,
                  threads=args.threads if args.threads is not None else cfg.threads)
    try:
        out = train_family(cfg, args.out, resume=args.resume, resume_from=args.resume_from)
    except ValueError as exc:
        if args.resume_from is None:
            raise
        p.error(str(exc))
    print(f"wrote {out}")
    return 0
