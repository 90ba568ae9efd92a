"""``relaydiff cache train``: REINFORCE training of the caching-schedule policy (ReCache).

Each update draws one training context (a prompt, its seed and a hand-off step k, with the host's relay state
and the *uncached* device half's image as the target), samples ``batch`` schedules from the policy, each
under its own random budget B in [2, m - 1] (B = 1 and B = m leave no choice), runs them as one batched
cached device half, decodes and scores them. The reward of a schedule is

    R = min(PSNR(image, uncached image), 60 dB) / 10 dB + attribute_weight * attribute accuracy (scorer)

and the update is REINFORCE (Williams 1992) with a baseline b:
``loss = -mean((R - b) log p(schedule)) - entropy_weight * mean(H)``, H the entropy of the softmax over the
candidate steps' scores. Two baselines: ``moving``, a moving average per (k, B); and ``loo`` (default), the
mean reward of the other ``group - 1`` schedules drawn for the same context and budget in the same update
(leave-one-out, as in VarGrad, Richter et al. 2020). Measured: with ``moving`` the prompt-to-prompt spread
of R swamped the effect of the schedule, and after 8 minutes the learned schedule was 6-13 dB worse than
uniform at k = 8; ``loo`` cancels the prompt's share of R (docs/cache.md).

Training prompts are drawn from the world's **train** split (``eval_prompts(prompts, prompt_seed,
split="train")``) with noise seeds ``noise_seed + i`` (2^40 + i, the range training runs use, disjoint from the
val/test evaluation seeds); ``relaydiff eval cache`` draws its prompts and noise seeds from the val split
(selection) or the test split (reported figures). Before 2026-12-02 training drew ``eval_prompts(n, 1000)``,
whose default split is *test*: the committed policies then were trained on test captions.

Time budget and resumption: ``minutes`` bounds the total wall time over all runs; a checkpoint
(``<out>.ckpt.safetensors`` with the policy and Adam moments, ``<out>.ckpt.json`` with counters and
baselines) is written every ``checkpoint_every_s`` and at the end, and a later run continues from it. Every
random draw is derived from (seed, update index), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.core.caching.denoiser import check_mechanism
from relaydiff.core.caching.policy import (
    PolicyConfig,
    SchedulePolicy,
    entropy_of,
    sample_mask,
    save_policy,
    step_features,
    unet_identity,
)
from relaydiff.cache.schedules import fixed_half
from relaydiff.core.errors import RelaydiffError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """What ``relaydiff cache train`` runs."""

    out: Path  # policy stem: writes <out>.json and <out>.safetensors
    family: Path | None = None  # family folder (default: the embedded family)
    mechanism: str = "reuse"  # "reuse" or "forecast"
    cache_branch: int = 0  # skip branch of the split
    minutes: float = 20.0  # total wall-time budget over all runs, context preparation included
    max_updates: int = 100_000  # stop after this many policy updates
    prompts: int = 24  # training prompts (split over 1/2/3 objects)
    prompt_seed: int = 1000  # eval_prompts seed of the training prompts (drawn from the train split)
    noise_seed: int = 2**40  # training prompt i uses noise seed noise_seed + i (relaydiff.world.splits: training seeds)
    relay_steps: tuple[int, ...] = (0, 4, 6, 8, 10, 12, 16)  # hand-off points k trained on
    steps: int = 25  # N
    guidance_scale: float = 5.0
    batch: int = 8  # schedules sampled per update (one batched device half)
    group: int = 4  # schedules per budget within an update (the leave-one-out baseline compares them)
    baseline: str = "loo"  # "loo": mean reward of the other schedules of the same budget and context; "moving": per (k, B) average
    lr: float = 3e-3  # Adam learning rate
    hidden: int = 32  # policy width
    # weight of the scorer's attribute accuracy in the reward. At 1.0 (before 2026-12-02) one attribute flip of a
    # 3-attribute prompt was worth 3.3 dB of PSNR: a discrete, noisy term outweighed the fidelity differences
    # between schedules of one budget (a few dB at low budgets); at 0.1 it breaks ties
    attribute_weight: float = 0.1
    entropy_weight: float = 0.01  # entropy regularisation
    baseline_decay: float = 0.9  # moving-average baseline: b <- decay b + (1 - decay) R
    psnr_cap_db: float = 60.0  # PSNR above this counts as this (identical images would be infinite)
    seed: int = 0  # seed of policy init and every draw
    checkpoint_every_s: float = 60.0
    curve_every: int = 10  # record the mean reward every this many updates

    def __post_init__(self) -> None:
        check_mechanism(self.mechanism)
        if not 0.0 <= self.attribute_weight <= 10.0:
            raise RelaydiffError(f"attribute weight {self.attribute_weight!r} must lie in [0, 10]")
        if self.baseline not in ("loo", "moving"):
            raise RelaydiffError(f"baseline must be 'loo' or 'moving', got {self.baseline!r}")
        if self.group < 2 or self.batch % self.group:
            raise RelaydiffError(f"group must be >= 2 and divide batch; got group {self.group}, batch {self.batch}")
        if self.minutes <= 0 or self.max_updates < 1 or self.prompts < 1 or self.batch < 1:
            raise RelaydiffError(f"minutes, max_updates, prompts and batch must be positive; got {self.minutes}, "
                                 f"{self.max_updates}, {self.prompts}, {self.batch}")
        bad = [k for k in self.relay_steps if not 0 <= k <= self.steps - 3]
        if bad or not self.relay_steps:
            raise RelaydiffError(f"training relay steps {list(self.relay_steps)} must lie in [0, {self.steps - 3}] "
                                 "(a budget needs at least 3 device steps to leave a choice)")


@dataclass
class _Context:
    prompt: str
    k: int
    state: Any  # RelayState at k
    reference: np.ndarray  # uncached device-half image (H, W, 3) uint8


@dataclass
class TrainState:
    """The resumable counters (saved in the checkpoint JSON)."""

    updates: int = 0
    episodes: int = 0
    wall_s: float = 0.0
    baselines: dict[str, float] = field(default_factory=dict)  # "k:B" -> moving average reward
    curve: list[float] = field(default_factory=list)  # mean reward per curve_every updates


def _ckpt_paths(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    return stem.parent / (stem.name + ".ckpt.json"), stem.parent / (stem.name + ".ckpt.safetensors")


def _save_ckpt(out: Path, policy: SchedulePolicy, opt: torch.optim.Adam, st: TrainState) -> None:
    from safetensors.torch import save_file

    js, sf = _ckpt_paths(out)
    js.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"policy.{k}": v.detach().contiguous() for k, v in policy.state_dict().items()}
    names = dict(policy.named_parameters())
    for name, p in names.items():
        s = opt.state.get(p)
        if s:
            tensors[f"adam.{name}.exp_avg"] = s["exp_avg"].contiguous()
            tensors[f"adam.{name}.exp_avg_sq"] = s["exp_avg_sq"].contiguous()
            tensors[f"adam.{name}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    tmp_sf, tmp_js = sf.parent / (sf.name + ".tmp"), js.parent / (js.name + ".tmp")
    save_file(tensors, str(tmp_sf))
    tmp_sf.replace(sf)
    tmp_js.write_text(json.dumps(asdict(st), indent=1) + "\n")
    tmp_js.replace(js)


def _load_ckpt(out: Path, policy: SchedulePolicy, opt: torch.optim.Adam) -> TrainState | None:
    from safetensors.torch import load_file

    js, sf = _ckpt_paths(out)
    if not (js.is_file() and sf.is_file()):
        return None
    try:
        raw = json.loads(js.read_text())
        tensors = load_file(str(sf))
        policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    except (json.JSONDecodeError, RuntimeError, OSError) as exc:
        raise RelaydiffError(f"checkpoint '{sf}' cannot be resumed ({exc}); delete it or pass --no-resume") from None
    for name, p in policy.named_parameters():
        if f"adam.{name}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"adam.{name}.exp_avg"], "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"],
                            "step": torch.tensor(float(tensors[f"adam.{name}.step"][0]))}
    return TrainState(updates=int(raw["updates"]), episodes=int(raw["episodes"]), wall_s=float(raw["wall_s"]),
                      baselines={str(k): float(v) for k, v in raw["baselines"].items()}, curve=[float(x) for x in raw["curve"]])


def prepare_contexts(host: Any, device: Any, cfg: TrainConfig, *, deadline: float | None = None) -> list[_Context]:
    """Relay states and uncached device-half images of the training prompts at every k of ``cfg.relay_steps``."""
    from relaydiff.core.relay import RelayRequest, decode, resume, snapshots
    from relaydiff.evaluate import eval_prompts

    out: list[_Context] = []
    ks = sorted(set(cfg.relay_steps))
    for i, prompt in enumerate(eval_prompts(cfg.prompts, cfg.prompt_seed, split="train")):
        if deadline is not None and time.perf_counter() > deadline and out:
            log.warning("time budget reached while preparing contexts; training on the first %d prompts", i)
            break
        req = RelayRequest(prompt, relay_step=0, steps=cfg.steps, guidance_scale=cfg.guidance_scale, seed=cfg.noise_seed + i)
        snaps = snapshots(host, req, [k for k in ks if k > 0]) if any(k > 0 for k in ks) else {}
        if 0 in ks:
            snaps[0] = snapshots(device, req, [0])[0]
        for k in ks:
            state = snaps[k][0]
            ref = decode(device, resume(device, state).latents)[0]
            out.append(_Context(prompt, k, state, ref))
    return out


def _rewards(device: Any, ctx: _Context, latents: torch.Tensor, cfg: TrainConfig) -> np.ndarray:
    from relaydiff.core.relay import decode
    from relaydiff.evaluate import psnr
    from relaydiff.scorer import score

    images = decode(device, latents)
    out = []
    for img in images:
        p = min(psnr(img, ctx.reference), cfg.psnr_cap_db)
        out.append(p / 10.0 + cfg.attribute_weight * score(img, ctx.prompt).attribute_accuracy)
    return np.asarray(out)


def train(cfg: TrainConfig, *, resume: bool = True, log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or continue training) the policy; writes it to ``cfg.out`` and returns its config as a dict."""
    from relaydiff.core import family

    t_start = time.perf_counter()
    root = cfg.family or family.default_family_dir()
    host_ref = family.resolve(root, role="host")
    dev_ref = family.resolve(root, role="device")
    host = family.load(host_ref)
    device = family.load(dev_ref, share_with=host)
    if device.student is not None:
        raise RelaydiffError(f"the device variant {dev_ref.variant!r} is a distilled student; caching runs the undistilled UNet")
    levels = len(device.unet.down_blocks)
    if not 0 <= cfg.cache_branch < levels:
        raise RelaydiffError(f"cache branch {cfg.cache_branch} does not exist in this UNet: the branch must be in [0, {levels - 1}]")
    torch.manual_seed(cfg.seed)
    policy = SchedulePolicy(hidden=cfg.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    st = (_load_ckpt(cfg.out, policy, opt) if resume else None) or TrainState()
    if st.updates and log_fn:
        log_fn(f"resuming at update {st.updates} ({st.wall_s:.0f} s spent)")
    budget_s = cfg.minutes * 60.0
    deadline = t_start + max(0.0, budget_s - st.wall_s)
    contexts = prepare_contexts(host, device, cfg, deadline=deadline)
    if log_fn:
        log_fn(f"{len(contexts)} training contexts ready in {time.perf_counter() - t_start:.0f} s")
    last_ckpt = time.perf_counter()
    window: list[float] = []

    def spent() -> float:
        return st.wall_s + (time.perf_counter() - t_start)

    wall_at_start = st.wall_s
    while st.updates < cfg.max_updates and time.perf_counter() < deadline:
        rng = np.random.default_rng([cfg.seed, st.updates])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        ctx = contexts[int(rng.integers(len(contexts)))]
        m = cfg.steps - ctx.k
        budgets = np.repeat(rng.integers(2, m, size=cfg.batch // cfg.group), cfg.group)  # B in [2, m - 1], `group` draws each
        masks, logps, ents = [], [], []
        for b in budgets:
            scores = policy(step_features(ctx.state.timesteps, ctx.k, int(b), ctx.state.scheduler_config))
            mask, logp = sample_mask(scores, int(b), gen)
            masks.append(mask)
            logps.append(logp)
            ents.append(entropy_of(scores))
        half = fixed_half(device, ctx.state, torch.stack(masks), mechanism=cfg.mechanism, cache_branch=cfg.cache_branch)
        rewards = _rewards(device, ctx, half.latents, cfg)
        adv = []
        for j, (b, r) in enumerate(zip(budgets, rewards)):
            key = f"{ctx.k}:{int(b)}"
            base = st.baselines.get(key, float(r))
            st.baselines[key] = cfg.baseline_decay * base + (1 - cfg.baseline_decay) * float(r)
            if cfg.baseline == "loo":  # the other schedules drawn for this context and budget (removes the prompt's variance)
                g0 = j - j % cfg.group
                others = [float(x) for i, x in enumerate(rewards[g0 : g0 + cfg.group]) if g0 + i != j]
                base = float(np.mean(others))
            adv.append(float(r) - base)
        loss = -(torch.tensor(adv) * torch.stack(logps)).mean() - cfg.entropy_weight * torch.stack(ents).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        st.updates += 1
        st.episodes += cfg.batch
        window.append(float(rewards.mean()))
        if len(window) == cfg.curve_every:
            st.curve.append(round(float(np.mean(window)), 4))
            window = []
            if log_fn:
                log_fn(f"update {st.updates}: mean reward {st.curve[-1]:.3f} ({spent():.0f} s)")
        if time.perf_counter() - last_ckpt > cfg.checkpoint_every_s:
            _save_ckpt(cfg.out, policy, opt, TrainState(st.updates, st.episodes, spent(), st.baselines, st.curve))
            last_ckpt = time.perf_counter()
    st.wall_s = wall_at_start + (time.perf_counter() - t_start)
    _save_ckpt(cfg.out, policy, opt, st)
    cfg_hash, weights_hash = unet_identity(device)
    training = {
        "updates": st.updates, "episodes": st.episodes, "wall_s": round(st.wall_s, 1), "minutes_budget": cfg.minutes,
        "prompts": cfg.prompts, "prompt_split": "train", "prompt_seed": cfg.prompt_seed, "noise_seed": cfg.noise_seed,
        "relay_steps": list(cfg.relay_steps), "batch": cfg.batch, "lr": cfg.lr, "attribute_weight": cfg.attribute_weight,
        "entropy_weight": cfg.entropy_weight, "baseline": cfg.baseline, "group": cfg.group, "baseline_decay": cfg.baseline_decay, "psnr_cap_db": cfg.psnr_cap_db,
        "seed": cfg.seed, "reward_curve": st.curve, "torch_threads": torch.get_num_threads(),
        "reward": "min(PSNR vs uncached, cap)/10 dB + attribute_weight * scorer attribute accuracy",
    }
    pcfg = PolicyConfig(family_id=device.family_id, unet_config_hash=cfg_hash, unet_weights_hash=weights_hash,
                        mechanism=cfg.mechanism, cache_branch=cfg.cache_branch, hidden=cfg.hidden, steps=cfg.steps,
                        guidance_scale=cfg.guidance_scale, training=training)
    js, sf = save_policy(cfg.out, policy, pcfg)
    return {**json.loads(pcfg.to_json()), "files": [str(js), str(sf)]}
