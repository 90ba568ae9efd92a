"""``relaydiff bench cache``: a cached step against a full step on ONNX and ExecuTorch, in the same run.

For every target of a bundle built with ``--cache`` whose runtime exists here, it loads ``unet_step_full``
and ``unet_step_cached`` (fp32) and times them on the bundle's parity fixtures, alternating full and cached
calls so that both see the same machine state, and reports the median of each and their ratio (issue 17's
target: a cached step <= 0.5x a full step). It then times the device half [k, N) of one state end to end
through the bundle's backend: uncached (``unet_step`` every step) against a budget of ``budget_fraction``
of the N - k steps, and reports the speed-up (target >= 1.5x at 50%).

Threads: onnxruntime runs with ``threads`` intra-op threads. ExecuTorch's Python runtime sizes its own
XNNPACK thread pool and offers no setting for it, so its figures are whatever that pool gives; the report
says so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.bundle import BundleError, Manifest, load_fixture, open_session
from relaydiff.runtime.sessions import runtime_unavailable

TARGETS = ("onnx", "executorch")


@dataclass(frozen=True)
class CacheBenchConfig:
    """What :func:`bench_cache` measures."""

    bundle: Path  # a bundle folder built with `relaydiff bundle build --cache`
    repeats: int = 20  # timed calls of each graph (alternating); the median is reported
    warmup: int = 2  # untimed calls of each before timing
    threads: int = 1  # onnxruntime intra-op threads
    budget_fraction: float = 0.5  # the budget of the end-to-end device half, as a share of N - k
    relay: bool = True  # also time the device half end to end
    relay_repeats: int = 3  # device halves timed per setting; the median is reported

    def __post_init__(self) -> None:
        for name in ("repeats", "threads", "relay_repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RelaydiffError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise RelaydiffError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not 0.0 < self.budget_fraction <= 1.0:
            raise RelaydiffError(f"budget fraction {self.budget_fraction!r} must lie in (0, 1]")


def bench_cache(config: CacheBenchConfig) -> dict[str, Any]:
    """Time full vs cached steps (and budgeted vs uncached device halves) per target; returns the report.

    Raises:
        BundleError: not a bundle, or no target with both cached-step graphs.
    """
    root = Path(config.bundle).resolve()
    manifest = Manifest.read(root)
    rows, skipped = [], []
    for target in TARGETS:
        entries = manifest.artifacts_for(target, "fp32")
        if "unet_step_full" not in entries or "unet_step_cached" not in entries:
            skipped.append({"target": target, "reason": "the bundle has no fp32 unet_step_full/unet_step_cached (build with --cache)"})
            continue
        reason = runtime_unavailable(target)
        if reason is not None:
            skipped.append({"target": target, "reason": reason})
            continue
        full = open_session(root, entries["unet_step_full"], threads=config.threads)
        cached = open_session(root, entries["unet_step_cached"], threads=config.threads)
        full_in, _ = load_fixture(root, manifest, "unet_step_full")
        cached_in, _ = load_fixture(root, manifest, "unet_step_cached")
        for _ in range(config.warmup):
            full(full_in), cached(cached_in)
        t_full, t_cached = [], []
        for _ in range(config.repeats):  # alternate, so that drift in the machine's load hits both alike
            t0 = time.perf_counter()
            full(full_in)
            t1 = time.perf_counter()
            cached(cached_in)
            t_cached.append(time.perf_counter() - t1)
            t_full.append(t1 - t0)
        f, c = statistics.median(t_full), statistics.median(t_cached)
        row: dict[str, Any] = {"target": target, "full_ms": round(f * 1e3, 3), "cached_ms": round(c * 1e3, 3),
                               "cached_over_full": round(c / f, 4),
                               "threads": config.threads if target == "onnx" else "ExecuTorch's own XNNPACK pool"}
        if config.relay:
            row.update(_device_half(root, target, config))
        rows.append(row)
    if not rows:
        raise BundleError(f"bundle '{root}': nothing to time", [f"{s['target']}: {s['reason']}" for s in skipped])
    return {"bundle": str(root), "repeats": config.repeats, "rows": rows, "skipped": skipped}


def _device_half(root: Path, target: str, config: CacheBenchConfig) -> dict[str, Any]:
    """Median seconds of the device half [k, N) of one state, uncached and with the budget, through the bundle backend."""
    from dataclasses import replace

    from relaydiff.core.caching.budget import budget_for
    from relaydiff.core.relay import RelayRequest
    from relaydiff.runtime.backends import create_backend

    backend: Any = create_backend(target, bundle_dir=root, threads=config.threads)  # a bundle backend: manifest, probe_state
    relay = backend.manifest.relay
    k, n = relay.relay_step, relay.steps
    budget = budget_for(config.budget_fraction, n - k)
    state = backend.probe_state(RelayRequest("a red circle left of a blue square", relay_step=0, steps=n))
    # hand over at the bundle's k: the grid and embeddings of a real state; the latent as drawn (timing only)
    state = replace(state, step_index=k)

    def timed(s: Any) -> float:
        times = []
        for _ in range(config.relay_repeats):
            t0 = time.perf_counter()
            backend.finish(s)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    backend.finish(replace(state, cache_budget=budget))  # warm-up of both graphs
    uncached, cached = timed(state), timed(replace(state, cache_budget=budget))
    return {"relay_step": k, "steps": n, "budget": budget, "half_uncached_s": round(uncached, 4),
            "half_cached_s": round(cached, 4), "half_speedup": round(uncached / cached, 3)}


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per target, then what was skipped."""
    lines = [f"bundle {report['bundle']}  ({report['repeats']} alternating calls each, median)"]
    for r in report["rows"]:
        line = f"{r['target']:<10} full {r['full_ms']:9.3f} ms  cached {r['cached_ms']:9.3f} ms  cached/full {r['cached_over_full']:.3f}"
        if "half_speedup" in r:
            line += (f"   device half k={r['relay_step']}/{r['steps']}: uncached {r['half_uncached_s']:.3f} s, "
                     f"B={r['budget']} {r['half_cached_s']:.3f} s, speed-up {r['half_speedup']:.2f}x")
        lines.append(line + f"   threads: {r['threads']}")
    lines += [f"skipped {s['target']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines)
