"""``relaydiff bench optimum``: relaydiff's ONNX device-only generation against optimum's ``ORTStableDiffusionPipeline``
on the same weights (a bundle built with ``--layout optimum``), in one run.

Both generate the same prompt, seed, step count and guidance (DDIM, [uncond, cond] CFG) on onnxruntime's CPU execution
provider with the same intra-op thread count; the runs alternate (relaydiff, optimum, relaydiff, ...) after one untimed
warm-up each, and the median seconds per image is reported with the ratio optimum / relaydiff (> 1: relaydiff is faster).
The images are compared too (max abs difference in uint8), so a fast but different pipeline does not pass unnoticed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError


@dataclass(frozen=True)
class OptimumBenchConfig:
    bundle: Path  # built with bundle build --layout optimum (and the onnx fp32 target)
    repeats: int = 3  # timed images per pipeline; the median is reported
    steps: int | None = None  # denoising steps; default: the bundle's N
    guidance_scale: float = 5.0
    threads: int = 1  # onnxruntime intra-op threads, both pipelines
    prompt: str = "a red circle above a blue square"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("repeats", 1), ("threads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RelaydiffError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise RelaydiffError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.guidance_scale > 1:
            raise RelaydiffError(f"guidance scale must be > 1 (the optimum layout's UNet is the CFG batch of two), got {self.guidance_scale!r}")


def bench_optimum(config: OptimumBenchConfig) -> dict[str, Any]:
    """Time both pipelines; return the report (seconds per image, ratio, image difference).

    Raises:
        BundleError: the bundle does not verify or has no optimum layout (built without --layout optimum).
    """
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from relaydiff.core.relay import RelayRequest
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.bundle import BundleError
    from relaydiff.runtime.device import DeviceRuntime

    backend: Any = create_backend("onnx", bundle_dir=config.bundle, threads=config.threads)  # verifies the bundle
    section = backend.manifest.optimum_layout
    if section is None:
        raise BundleError(f"bundle '{config.bundle}' has no optimum layout: build it with `relaydiff bundle build --layout optimum`")
    steps = config.steps or backend.manifest.relay.steps
    runtime = DeviceRuntime(backend)
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.threads
    so.inter_op_num_threads = 1
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(Path(config.bundle) / section.folder), export=False, session_options=so)
    pipe.set_progress_bar_config(disable=True)
    request = RelayRequest(config.prompt, relay_step=0, steps=steps, guidance_scale=config.guidance_scale, seed=config.seed)

    def ours() -> np.ndarray:
        return runtime.generate(request).image

    def theirs() -> np.ndarray:
        out = pipe(config.prompt, num_inference_steps=steps, guidance_scale=config.guidance_scale, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(config.seed)).images[0]
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    a, b = ours(), theirs()  # warm-up (first-call allocations), and the images compared
    times: dict[str, list[float]] = {"relaydiff": [], "optimum": []}
    for _ in range(config.repeats):
        for name, fn in (("relaydiff", ours), ("optimum", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"bundle": str(config.bundle), "steps": steps, "threads": config.threads, "repeats": config.repeats,
            "relaydiff_s": round(med["relaydiff"], 4), "optimum_s": round(med["optimum"], 4),
            "ratio_optimum_over_relaydiff": round(med["optimum"] / max(med["relaydiff"], 1e-9), 3),
            "image_max_abs_u8": int(np.abs(a.astype(int) - b.astype(int)).max()), "safety": runtime.generate(request).safety.to_json(),
            "note": "one run on this machine; label figures from a contended machine 'contended, not a result'"}


def format_report(report: dict[str, Any]) -> str:
    return (f"device-only, {report['steps']} steps, {report['threads']} thread(s), median of {report['repeats']}: "
            f"relaydiff onnx {report['relaydiff_s']:.3f} s/image, optimum ORTStableDiffusionPipeline {report['optimum_s']:.3f} s/image; "
            f"ratio optimum/relaydiff {report['ratio_optimum_over_relaydiff']:.2f}x (>1: relaydiff faster); "
            f"images differ by <= {report['image_max_abs_u8']}/255")
