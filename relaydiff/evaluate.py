"""``relaydiff eval relay``: quality and cost of the relay as a function of the hand-off step (RISE Fig. 5).

Prompts and noise seeds come from the world's held-out **test split** by default
(``relaydiff.world.splits``: captions no training run ever draws, noise seeds no training run uses), in
equal numbers of 1-, 2- and 3-object prompts; ``split="val"`` draws the validation split instead, which
is the one model selection and tuning may use. For each prompt one host trajectory is run and
snapshotted at every relay step k of the sweep; the device finishes each snapshot. Every image is scored
by the independent classical scorer (``relaydiff.scorer``) and compared with the host-only image of the
same seed (PSNR, SSIM). Host and device compute seconds are measured per k. Every accuracy comes with a
95% bootstrap confidence interval over prompts, and every relay step's difference to host-only with a
paired one (the same prompts resampled for both); per-check failure rates say which checks fail.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.family import LoadedModel
from relaydiff.core.relay import RelayRequest, decode, resume, snapshots


@dataclass(frozen=True)
class EvalConfig:
    """What ``relaydiff eval relay`` runs."""

    prompts: int = 200  # number of prompts, split evenly over 1-, 2- and 3-object scenes
    steps: int = 25  # denoising steps N
    sampler: str = "ddim"  # sampler name
    guidance_scale: float = 5.0  # CFG scale
    seed: int = 0  # prompt-set index within the split; prompt i uses noise seed noise_seed(split, seed * 100000 + i)
    split: str = "test"  # "test" (reported figures) or "val" (model selection, tuning)
    fractions: tuple[float, ...] = tuple(i / 10 for i in range(11))  # relay steps as fractions of N
    grid_rows: int = 8  # prompts shown in the PNG grid

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise RelaydiffError(f"--prompts must be >= 1, got {self.prompts}")
        if self.steps < 1:
            raise RelaydiffError(f"--steps must be >= 1, got {self.steps}")
        if any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise RelaydiffError(f"relay fractions must lie in [0, 1], got {self.fractions}")
        if self.split not in EVAL_SPLITS:
            raise RelaydiffError(f"--split must be one of {EVAL_SPLITS}, got {self.split!r}")
        if not 0 <= self.seed < 10_000:
            raise RelaydiffError(f"--seed must be in [0, 10000), got {self.seed}")
        if self.prompts > 100_000:
            raise RelaydiffError(f"--prompts must be <= 100000, got {self.prompts}")

    @property
    def relay_steps(self) -> list[int]:
        return sorted({round(f * self.steps) for f in self.fractions})


EVAL_SPLITS = ("test", "val")


def eval_prompts(n: int, seed: int, split: str = "test") -> list[str]:
    """``n`` prompts of ``split``, as even as possible over 1, 2 and 3 objects (in that order)."""
    from relaydiff.world import split_prompts

    counts = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    out: list[str] = []
    for n_obj, c in zip((1, 2, 3), counts):
        out += split_prompts(split, c, n_obj, seed=seed)
    return out


def eval_noise_seed(split: str, seed: int, index: int) -> int:
    """Noise seed of prompt ``index`` of prompt set ``seed`` of ``split``."""
    from relaydiff.world import noise_seed

    return noise_seed(split, seed * 100_000 + index)


def bootstrap_ci(values: Any, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (one value per prompt); scipy.stats.bootstrap.

    A constant sample (all right or all wrong) gives the degenerate interval (v, v).
    """
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    rng=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_diff_ci(a: Any, b: Any, *, confidence: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its percentile bootstrap CI, resampling prompts (pairs) jointly."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal shapes, got {x.shape} and {y.shape}")
    d = x - y
    lo, hi = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return float(d.mean()), lo, hi


def check_kind(name: str) -> str:
    """The kind of a scorer check name: ``object1.shape`` -> ``shape``, ``relation0`` -> ``relation``."""
    return name.rsplit(".", 1)[-1].rstrip("0123456789")


def failure_rates(check_lists: list[list[tuple[str, bool]]]) -> dict[str, float]:
    """Share of checks of each kind that failed, over all images' ``ScoreResult.checks``."""
    seen: dict[str, int] = defaultdict(int)
    failed: dict[str, int] = defaultdict(int)
    for checks in check_lists:
        for name, ok in checks:
            kind = check_kind(name)
            seen[kind] += 1
            failed[kind] += not ok
    return {k: round(failed[k] / seen[k], 4) for k in sorted(seen)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 RGB images (scikit-image, 7x7 window)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=7))


def run_eval(host: LoadedModel, device: LoadedModel, cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Sweep the relay step over ``cfg.fractions`` for ``cfg.prompts`` prompts; returns the report and images."""
    from tqdm.auto import tqdm

    from relaydiff.scorer import score
    from relaydiff.world import parse_prompt

    prompts = eval_prompts(cfg.prompts, cfg.seed, cfg.split)
    ks = cfg.relay_steps
    n = cfg.steps
    rows: list[dict[str, Any]] = []
    grid: list[list[np.ndarray]] = []
    shown = {int(v) for v in np.linspace(0, len(prompts) - 1, min(cfg.grid_rows, len(prompts))).round()}
    for i, prompt in enumerate(tqdm(prompts, desc="eval relay", disable=not progress)):
        spec = parse_prompt(prompt)
        seed = eval_noise_seed(cfg.split, cfg.seed, i)
        req = RelayRequest(prompt, relay_step=0, steps=n, sampler=cfg.sampler, guidance_scale=cfg.guidance_scale, seed=seed)
        host_snaps = snapshots(host, req, [k for k in ks if k > 0] or [n])
        images: dict[int, np.ndarray] = {}
        cost: dict[int, tuple[float, float]] = {}
        for k in ks:
            t0 = time.perf_counter()
            if k == 0:  # device-only: the device encodes the prompt itself
                state, _ = snapshots(device, replace(req, relay_step=0), [0])[0]
                host_s = 0.0
            else:
                state, host_s = host_snaps[k]
                t0 = time.perf_counter()
            final = resume(device, state)
            images[k] = decode(device, final.latents)[0]
            cost[k] = (host_s, time.perf_counter() - t0)
        if n not in images:
            raise RelaydiffError("the sweep must include k = N (host-only) as the reference")
        ref = images[n]
        for k in ks:
            result = score(images[k], prompt)
            rows.append({
                "prompt": prompt, "seed": seed, "n_objects": spec.n_objects, "complexity": spec.complexity,
                "k": k, "fraction": k / n, "correct": bool(result.correct),
                "failed_checks": ";".join(name for name, ok in result.checks if not ok),
                "checks": ";".join(name for name, _ in result.checks),
                "attribute_accuracy": float(result.attribute_accuracy),
                "psnr": _finite_or_none(psnr(images[k], ref)), "ssim": ssim(images[k], ref),
                "host_seconds": cost[k][0], "device_seconds": cost[k][1],
            })
        if i in shown:
            grid.append([images[k] for k in ks])
    return {"config": asdict(cfg), "relay_steps": ks, "summary": summarize(rows, ks, n), "rows": rows, "grid": grid}


def _finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _row_checks(r: dict[str, Any]) -> list[tuple[str, bool]]:
    failed = set(filter(None, r["failed_checks"].split(";")))
    return [(name, name not in failed) for name in filter(None, r["checks"].split(";"))]


def summarize(rows: list[dict[str, Any]], ks: list[int], n: int) -> list[dict[str, Any]]:
    """Per relay step k: prompt accuracy overall and by object count (each with a 95% bootstrap CI over prompts),
    its paired difference to host-only (k = N) with CI, PSNR/SSIM vs host-only, per-check failure rates, seconds."""
    by_k: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_k[r["k"]].append(r)
    ref = sorted(by_k.get(n, []), key=lambda r: r["seed"])
    out = []
    for k in ks:
        rs = by_k[k]
        finite = [r["psnr"] for r in rs if r["psnr"] is not None]
        correct = [r["correct"] for r in rs]
        entry: dict[str, Any] = {
            "k": k,
            "fraction": round(k / n, 3),
            "prompts": len(rs),
            "accuracy": float(np.mean(correct)),
            "accuracy_ci95": list(bootstrap_ci(correct)),
            "attribute_accuracy": float(np.mean([r["attribute_accuracy"] for r in rs])),
            "attribute_accuracy_ci95": list(bootstrap_ci([r["attribute_accuracy"] for r in rs])),
            "psnr_vs_host_db": float(np.mean(finite)) if finite else None,  # None: identical to host-only
            "ssim_vs_host": float(np.mean([r["ssim"] for r in rs])),
            "host_seconds": float(np.mean([r["host_seconds"] for r in rs])),
            "device_seconds": float(np.mean([r["device_seconds"] for r in rs])),
        }
        for m in sorted({r["n_objects"] for r in rs}):
            sub = [r["correct"] for r in rs if r["n_objects"] == m]
            entry[f"accuracy_{m}obj"] = float(np.mean(sub))
            entry[f"accuracy_{m}obj_ci95"] = list(bootstrap_ci(sub))
        if len(ref) == len(rs) and k != n:  # paired by prompt: the same seeds at k and at N
            mine = sorted(rs, key=lambda r: r["seed"])
            d, lo, hi = paired_diff_ci([r["correct"] for r in mine], [r["correct"] for r in ref])
            entry["accuracy_minus_host"] = [d, lo, hi]
            for m in sorted({r["n_objects"] for r in rs}):
                a = [r["correct"] for r in mine if r["n_objects"] == m]
                b = [r["correct"] for r in ref if r["n_objects"] == m]
                entry[f"accuracy_{m}obj_minus_host"] = list(paired_diff_ci(a, b))
        entry["failed_checks"] = failure_rates([_row_checks(r) for r in rs])
        for c in sorted({r["complexity"] for r in rs}):
            sub = [r["correct"] for r in rs if r["complexity"] == c]
            entry.setdefault("accuracy_by_complexity", {})[str(c)] = [float(np.mean(sub)), len(sub)]
            att = [r["attribute_accuracy"] for r in rs if r["complexity"] == c]
            entry.setdefault("attribute_accuracy_by_complexity", {})[str(c)] = [float(np.mean(att)), len(att)]
        out.append(entry)
    return out


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write report.json, rows.csv, grid.png (rows prompts, columns k) and accuracy.png into ``out_dir``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out_dir / name) for name in ("report.json", "rows.csv", "grid.png", "accuracy.png")}
    public = {k: v for k, v in report.items() if k != "grid"}
    Path(paths["report.json"]).write_text(json.dumps(public, indent=2, default=float) + "\n")
    with open(paths["rows.csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report["rows"][0]))
        w.writeheader()
        w.writerows(report["rows"])
    grid = report["grid"]
    if grid:
        scale = 3
        h, w_ = grid[0][0].shape[:2]
        canvas = np.full((len(grid) * (h + 2), len(grid[0]) * (w_ + 2), 3), 255, np.uint8)
        for r, row in enumerate(grid):
            for c, img in enumerate(row):
                canvas[r * (h + 2) : r * (h + 2) + h, c * (w_ + 2) : c * (w_ + 2) + w_] = img
        Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST).save(paths["grid.png"])
    summary = report["summary"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = [s["fraction"] for s in summary]
    ax.plot(x, [100 * s["accuracy"] for s in summary], "o-", lw=2, label="all prompts")
    for m in (1, 2, 3):
        key = f"accuracy_{m}obj"
        if key in summary[0]:
            ax.plot(x, [100 * s[key] for s in summary], ".--", label=f"{m} object{'s' if m > 1 else ''}")
    ax.set_xlabel("relay step k / N  (0 = device-only, 1 = host-only)")
    ax.set_ylabel("prompt accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["accuracy.png"], dpi=110)
    plt.close(fig)
    return paths
