"""``relaydiff eval cache``: quality and cost of cached device halves per budget, schedule and mechanism.

For each evaluation prompt (``eval_prompts(prompts, seed, split)`` of the world's val split, for selection,
or its test split, for reported figures; noise seed ``eval_noise_seed(split, seed, i)``; the training prompts of
:mod:`relaydiff.cache.train` come from the train split) and each hand-off k, the host's relay state is finished
by the uncached device half (the reference) and by every (mechanism, schedule, budget). Each image is
scored (prompt and attribute accuracy) and compared with the uncached image of the same seed (PSNR, capped
at 60 dB so identical images count as 60, and SSIM). Confidence intervals are 95% percentile bootstraps over
prompts (scipy.stats.bootstrap), paired by prompt for every difference.

Cost: device FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` on one full and one
cached step (both CFG halves, batch 2; it counts matmuls, convolutions and attention, not norms or
activations); the device half costs B full + (m - B) cached steps. Latency is measured on torch, one
trajectory at a time, on the uniform schedule of each budget (the cost of a step does not depend on which
steps are full), against the uncached half in the same run, interleaved, fastest of ``latency_repeats``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaydiff.core.caching.denoiser import MECHANISMS, CachedDenoiser, check_mechanism
from relaydiff.core.caching.policy import check_policy_for, learned_mask, load_policy
from relaydiff.cache.run import cached_half, fixed
from relaydiff.cache.schedules import SCHEDULES, budget_for, check_budget, fixed_half, heuristic_half, uniform_mask
from relaydiff.core.errors import RelaydiffError

PSNR_CAP_DB = 60.0
DEFAULT_FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)


@dataclass(frozen=True)
class CacheEvalConfig:
    """What ``relaydiff eval cache`` runs."""

    prompts: int = 60  # evaluation prompts (split over 1/2/3 objects)
    seed: int = 0  # prompt-set index within the split; prompt i uses noise seed eval_noise_seed(split, seed, i)
    split: str = "test"  # "test" (reported figures) or "val" (selection, tuning)
    steps: int = 25  # N
    guidance_scale: float = 5.0
    relay_steps: tuple[int, ...] = (8,)  # hand-off points k
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # budgets as fractions of N - k (used when budgets is empty)
    budgets: tuple[int, ...] = ()  # explicit budgets B (each checked against [1, N - k])
    mechanisms: tuple[str, ...] = MECHANISMS
    schedules: tuple[str, ...] = SCHEDULES
    cache_branch: int = 0
    policy_dir: str | None = None  # folder with <mechanism>.json/.safetensors (default: the family's cache_policy/)
    latency_prompts: int = 3  # prompts whose hand-offs are timed
    latency_repeats: int = 3
    bootstrap: int = 2000  # bootstrap resamples
    grid_rows: int = 4  # prompts shown in grid.png

    def __post_init__(self) -> None:
        if self.split not in ("val", "test"):
            raise RelaydiffError(f"split must be 'val' or 'test', got {self.split!r}")
        if self.prompts < 1 or self.steps < 2:
            raise RelaydiffError(f"--prompts must be >= 1 and --steps >= 2, got {self.prompts} and {self.steps}")
        for k in self.relay_steps:
            if not 0 <= k < self.steps:
                raise RelaydiffError(f"relay step {k} is outside [0, {self.steps - 1}] (the device must run at least one step)")
        for m in self.mechanisms:
            check_mechanism(m)
        for s in self.schedules:
            if s not in SCHEDULES:
                raise RelaydiffError(f"unknown schedule {s!r}; expected one of: {', '.join(SCHEDULES)}")
        for k in self.relay_steps:
            for b in self.budgets:
                check_budget(b, self.steps - k)
        for f in self.fractions:
            budget_for(f, self.steps)

    def budgets_for(self, k: int) -> list[int]:
        m = self.steps - k
        bs = list(self.budgets) if self.budgets else [budget_for(f, m) for f in self.fractions]
        return sorted(set(bs), reverse=True)


def step_flops(unet: Any, cache_branch: int, latent: torch.Tensor, embeds: torch.Tensor) -> tuple[int, int]:
    """(full, cached) FLOPs of one step on a batch of ``latent`` rows, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    den = CachedDenoiser(unet, "reuse", cache_branch)
    t = torch.tensor(500)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            den(latent, t, embeds, step=0, recompute=True)
        full = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            den(latent, t, embeds, step=1, recompute=False)
        cached = fc.get_total_flops()
    return int(full), int(cached)


def _bootstrap_ci(values: np.ndarray, n: int, seed: int = 0) -> list[float]:
    """95% percentile bootstrap CI of the mean (scipy.stats.bootstrap); a constant sample gives [v, v]."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        v = float(values.mean()) if len(values) else float("nan")
        return [v, v]
    res = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=n, method="percentile",
                    random_state=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def _policies(device: Any, cfg: CacheEvalConfig) -> dict[str, Any]:
    if "learned" not in cfg.schedules:
        return {}
    folder = Path(cfg.policy_dir) if cfg.policy_dir else device.ref.root / "cache_policy"
    out = {}
    for mech in cfg.mechanisms:
        path = folder / f"{mech}.json"
        if not path.is_file():
            raise RelaydiffError(f"no learned {mech} policy at '{path}'; train one with `relaydiff cache train --mechanism {mech} "
                                 f"--out {folder / mech}` or leave 'learned' out of --schedules")
        policy, pcfg = load_policy(path)
        check_policy_for(pcfg, device, str(path))
        if pcfg.mechanism != mech or pcfg.cache_branch != cfg.cache_branch:
            raise RelaydiffError(f"policy '{path}' is for mechanism {pcfg.mechanism!r}, branch {pcfg.cache_branch}; "
                                 f"this evaluation runs {mech!r}, branch {cfg.cache_branch}")
        out[mech] = policy
    return out


def run_cache_eval(host: Any, device: Any, cfg: CacheEvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation; returns the report (``grid`` holds images for :func:`write_outputs`)."""
    from tqdm.auto import tqdm

    from relaydiff.core.caching.split import SplitUNet
    from relaydiff.core.relay import RelayRequest, decode, resume, snapshots
    from relaydiff.evaluate import eval_noise_seed, eval_prompts, psnr, ssim
    from relaydiff.scorer import score

    SplitUNet(device.unet, cfg.cache_branch)  # validates the branch before any work
    if device.student is not None:
        raise RelaydiffError("feature caching runs the undistilled device UNet; the device variant is a distilled student")
    policies = _policies(device, cfg)
    prompts = eval_prompts(cfg.prompts, cfg.seed, cfg.split)
    rows: list[dict[str, Any]] = []
    grid: list[list[np.ndarray]] = []
    latency_states: dict[int, list[Any]] = {k: [] for k in cfg.relay_steps}
    shown = {int(v) for v in np.linspace(0, len(prompts) - 1, min(cfg.grid_rows, len(prompts))).round()}
    ks = sorted(set(cfg.relay_steps))
    for i, prompt in enumerate(tqdm(prompts, desc="eval cache", disable=not progress)):
        req = RelayRequest(prompt, relay_step=0, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                           seed=eval_noise_seed(cfg.split, cfg.seed, i))
        snaps = snapshots(host, req, [k for k in ks if k > 0]) if any(k > 0 for k in ks) else {}
        if 0 in ks:
            snaps[0] = snapshots(device, req, [0])[0]
        for k in ks:
            state = snaps[k][0]
            if i < cfg.latency_prompts:
                latency_states[k].append(state)
            ref = decode(device, resume(device, state).latents)[0]
            ref_score = score(ref, prompt)
            base = {"prompt": prompt, "seed": req.seed, "k": k}
            rows.append({**base, "mechanism": "none", "schedule": "uncached", "budget": cfg.steps - k, "fraction": 1.0,
                         "correct": bool(ref_score.correct), "attribute_accuracy": float(ref_score.attribute_accuracy),
                         "psnr": PSNR_CAP_DB, "ssim": 1.0, "schedule_mask": "1" * (cfg.steps - k)})
            budgets = cfg.budgets_for(k)
            m = cfg.steps - k
            grid_row: list[np.ndarray] = [ref]
            for mech in cfg.mechanisms:
                for sched in cfg.schedules:
                    if sched == "uniform":
                        half = fixed_half(device, state, torch.stack([uniform_mask(m, b) for b in budgets]), mechanism=mech,
                                          cache_branch=cfg.cache_branch)
                    elif sched == "learned":
                        masks = torch.stack([learned_mask(policies[mech], state.timesteps, k, b, state.scheduler_config) for b in budgets])
                        half = fixed_half(device, state, masks, mechanism=mech, cache_branch=cfg.cache_branch)
                    else:
                        half, _ = heuristic_half(device, state, budgets, mechanism=mech, cache_branch=cfg.cache_branch)
                    images = decode(device, half.latents)
                    for b, img, mask in zip(budgets, images, half.recomputed):
                        if int(mask.sum()) != b:
                            raise RuntimeError(f"schedule {sched} spent {int(mask.sum())} full steps, budget {b}")
                        sc = score(img, prompt)
                        rows.append({**base, "mechanism": mech, "schedule": sched, "budget": b, "fraction": round(b / m, 4),
                                     "correct": bool(sc.correct), "attribute_accuracy": float(sc.attribute_accuracy),
                                     "psnr": min(psnr(img, ref), PSNR_CAP_DB), "ssim": ssim(img, ref),
                                     "schedule_mask": "".join("1" if v else "0" for v in mask.tolist())})
                        if k == ks[0]:
                            grid_row.append(img)
            if i in shown and k == ks[0]:
                grid.append(grid_row)
    flops = _flops(device, cfg, ks)
    latency = _latency(device, cfg, latency_states)
    summary = summarize(rows, cfg, flops, latency)
    return {"config": asdict(cfg), "psnr_cap_db": PSNR_CAP_DB, "flops": flops, "latency": latency, "summary": summary,
            "comparisons": compare(rows, cfg), "rows": rows, "grid": grid,
            "grid_columns": ["uncached"] + [f"{mech}/{s}/B={b}" for mech in cfg.mechanisms for s in cfg.schedules
                                            for b in cfg.budgets_for(ks[0])]}


def _flops(device: Any, cfg: CacheEvalConfig, ks: list[int]) -> dict[str, Any]:
    unet = device.unet
    c, s = int(unet.config.in_channels), int(unet.config.sample_size)
    rows = 2 if cfg.guidance_scale > 1.0 else 1
    dim = int(unet.config.cross_attention_dim)
    length = int(device.tokenizer.model_max_length)
    full, cached = step_flops(unet, cfg.cache_branch, torch.zeros(rows, c, s, s), torch.zeros(rows, length, dim))
    per_k = {}
    for k in ks:
        m = cfg.steps - k
        per_k[str(k)] = {str(b): {"flops": b * full + (m - b) * cached, "ratio_vs_uncached": (b * full + (m - b) * cached) / (m * full)}
                         for b in cfg.budgets_for(k)}
    return {"full_step": full, "cached_step": cached, "cached_over_full": cached / full, "batch_rows": rows,
            "device_half": per_k, "counter": "torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention)"}


def _latency(device: Any, cfg: CacheEvalConfig, states: dict[int, list[Any]]) -> dict[str, Any]:
    """Seconds of one cached device half per budget (steps only, no decode), uncached (B = m) in the same run.

    The budgets are timed interleaved, repeat after repeat, and each keeps its fastest repeat (the least
    disturbed by other processes on a shared CPU); the figure is the mean of that over the timed hand-offs.
    """
    from relaydiff.core.relay import resume

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": cfg.latency_repeats, "statistic": "min over repeats, mean over prompts",
                           "per_k": {}}
    for k, sts in states.items():
        if not sts:
            continue
        m = cfg.steps - k
        budgets = sorted({m, *cfg.budgets_for(k)}, reverse=True)
        entry: dict[str, Any] = {}
        for mech in cfg.mechanisms:
            best = {b: [float("inf")] * len(sts) for b in budgets}
            for _ in range(cfg.latency_repeats):
                for si, st in enumerate(sts):
                    for b in budgets:
                        mask = uniform_mask(m, b)[None]
                        t0 = time.perf_counter()
                        cached_half(device, st, fixed(mask), 1, mechanism=mech, cache_branch=cfg.cache_branch)
                        best[b][si] = min(best[b][si], time.perf_counter() - t0)
            times = {b: float(np.mean(v)) for b, v in best.items()}
            entry[mech] = {str(b): {"seconds": t, "ratio_vs_uncached": t / times[m], "speedup": times[m] / t} for b, t in times.items()}
        resume_best = []
        for st in sts:
            ts = []
            for _ in range(cfg.latency_repeats):
                t0 = time.perf_counter()
                resume(device, st)
                ts.append(time.perf_counter() - t0)
            resume_best.append(min(ts))
        entry["relay_resume_seconds"] = float(np.mean(resume_best))  # the relay's own uncached device half, for reference
        out["per_k"][str(k)] = entry
    return out


def summarize(rows: list[dict[str, Any]], cfg: CacheEvalConfig, flops: dict[str, Any], latency: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (k, mechanism, schedule, budget): accuracies and their paired differences to uncached, PSNR/SSIM, cost."""
    ref = {(r["seed"], r["k"]): r for r in rows if r["schedule"] == "uncached"}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["k"], r["mechanism"], r["schedule"], r["budget"]), []).append(r)
    out = []
    for (k, mech, sched, b), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = np.array([r["correct"] for r in rs], float)
        att = np.array([r["attribute_accuracy"] for r in rs], float)
        acc_ref = np.array([ref[(r["seed"], k)]["correct"] for r in rs], float)
        att_ref = np.array([ref[(r["seed"], k)]["attribute_accuracy"] for r in rs], float)
        ps = np.array([r["psnr"] for r in rs], float)
        entry: dict[str, Any] = {
            "k": k, "mechanism": mech, "schedule": sched, "budget": b, "fraction": round(b / (cfg.steps - k), 4), "prompts": len(rs),
            "accuracy": float(acc.mean()), "accuracy_ci": _bootstrap_ci(acc, cfg.bootstrap),
            "accuracy_minus_uncached": float((acc - acc_ref).mean()), "accuracy_minus_uncached_ci": _bootstrap_ci(acc - acc_ref, cfg.bootstrap),
            "attribute_accuracy": float(att.mean()), "attribute_accuracy_ci": _bootstrap_ci(att, cfg.bootstrap),
            "attribute_accuracy_minus_uncached": float((att - att_ref).mean()),
            "attribute_accuracy_minus_uncached_ci": _bootstrap_ci(att - att_ref, cfg.bootstrap),
            "psnr_db": float(ps.mean()), "psnr_db_ci": _bootstrap_ci(ps, cfg.bootstrap),
            "ssim": float(np.mean([r["ssim"] for r in rs])),
        }
        if mech != "none":
            entry["flops_ratio_vs_uncached"] = flops["device_half"][str(k)][str(b)]["ratio_vs_uncached"]
            lat = latency["per_k"].get(str(k), {}).get(mech, {}).get(str(b))
            entry["latency_ratio_vs_uncached"] = None if lat is None else lat["ratio_vs_uncached"]
        out.append(entry)
    return sorted(out, key=lambda e: (e["k"], e["mechanism"], e["schedule"], -e["budget"]))


def compare(rows: list[dict[str, Any]], cfg: CacheEvalConfig) -> list[dict[str, Any]]:
    """Paired PSNR and accuracy differences between schedules at each (k, mechanism, budget)."""
    by: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["k"], r["mechanism"], r["schedule"], r["budget"]), {})[r["seed"]] = r
    pairs = [("learned", "uniform"), ("learned", "heuristic"), ("heuristic", "uniform")]
    out = []
    for k in sorted(set(cfg.relay_steps)):
        for mech in cfg.mechanisms:
            for b in cfg.budgets_for(k):
                for a, c in pairs:
                    ra, rc = by.get((k, mech, a, b)), by.get((k, mech, c, b))
                    if not ra or not rc:
                        continue
                    seeds = sorted(set(ra) & set(rc))
                    d = np.array([ra[s]["psnr"] - rc[s]["psnr"] for s in seeds])
                    da = np.array([float(ra[s]["correct"]) - float(rc[s]["correct"]) for s in seeds])
                    ci = _bootstrap_ci(d, cfg.bootstrap)
                    out.append({"k": k, "mechanism": mech, "budget": b, "fraction": round(b / (cfg.steps - k), 4),
                                "a": a, "b": c, "psnr_diff_db": float(d.mean()), "psnr_diff_ci": ci,
                                "a_better": ci[0] > 0, "b_better": ci[1] < 0,
                                "accuracy_diff": float(da.mean()), "accuracy_diff_ci": _bootstrap_ci(da, cfg.bootstrap)})
    return out


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write report.json, rows.csv, grid.png and quality.png (PSNR and accuracy vs budget per schedule)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out_dir / name) for name in ("report.json", "rows.csv", "grid.png", "quality.png")}
    Path(paths["report.json"]).write_text(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=1) + "\n")
    with open(paths["rows.csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report["rows"][0]))
        w.writeheader()
        w.writerows(report["rows"])
    grid = report["grid"]
    if grid:
        h, w_ = grid[0][0].shape[:2]
        canvas = np.full((len(grid) * (h + 2), len(grid[0]) * (w_ + 2), 3), 255, np.uint8)
        for r, row in enumerate(grid):
            for c, img in enumerate(row):
                canvas[r * (h + 2): r * (h + 2) + h, c * (w_ + 2): c * (w_ + 2) + w_] = img
        Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.Resampling.NEAREST).save(paths["grid.png"])
    k0 = min(report["config"]["relay_steps"])
    summ = [s for s in report["summary"] if s["k"] == k0]
    unc = next(s for s in summ if s["schedule"] == "uncached")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mech, style in zip(report["config"]["mechanisms"], ("-", "--")):
        for sched, marker in zip(report["config"]["schedules"], ("o", "s", "^")):
            ss = sorted((s for s in summ if s["mechanism"] == mech and s["schedule"] == sched), key=lambda s: s["fraction"])
            x = [s["fraction"] for s in ss]
            axes[0].plot(x, [s["psnr_db"] for s in ss], marker=marker, ls=style, label=f"{sched} ({mech})")
            axes[1].plot(x, [100 * s["accuracy"] for s in ss], marker=marker, ls=style, label=f"{sched} ({mech})")
    axes[1].axhline(100 * unc["accuracy"], color="k", lw=1, label="uncached")
    axes[0].set_ylabel(f"PSNR vs uncached (dB, capped at {report['psnr_cap_db']:.0f})")
    axes[1].set_ylabel("prompt accuracy (%)")
    for ax in axes:
        ax.set_xlabel(f"budget B / (N - k), k = {k0}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["quality.png"], dpi=110)
    plt.close(fig)
    return paths
