"""Relay-aware vs whole-trajectory INT8 calibration of the ONNX ``unet_step``, on a trained family.

    relaydiff quantize compare [--family DIR] [--variant device|student] [--relay-step 8] [--steps 25] [--json]

For each activation width (W8A16, W8A8) and each calibration set (``mode="relay"``: device steps [k, N)
after real host hand-offs; ``mode="whole"``: device-only trajectories [0, N)), the fp32 ONNX export of the
device UNet is quantized with onnxruntime's static QDQ and measured on held-out relays
(:func:`relaydiff.quantize.parity.relay_parity`, prompt seed 1000): denoiser error on every device step and
the final-image PSNR of the whole device half against fp32 torch. The calibration sets have the same number
of prompts; the whole-trajectory one therefore holds N/(N-k) times more samples.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMES = {"w8a16": "QInt16", "w8a8": "QUInt8"}


def compare(family_dir: Path, variant: str | None = None, relay_step: int = 8, steps: int = 25, prompts: int = 4,
            eval_prompts: int = 3, log: Any = None) -> dict[str, Any]:
    """Quantize with each (scheme, calibration mode) and measure; returns rows of figures."""
    import torch

    from relaydiff.core import family
    from relaydiff.export import get_exporter
    from relaydiff.export.components import component_for
    from relaydiff.quantize.calibration import CalibrationConfig, capture
    from relaydiff.quantize.onnx_int8 import OnnxInt8Config, quantize_onnx, session_runner
    from relaydiff.quantize.parity import eval_config, relay_parity

    say = log or (lambda _m: None)
    torch.set_num_threads(1)
    host = family.load(family.resolve(family_dir, role="host"))
    device = family.load(family.resolve(family_dir, variant, role="device"), share_with=host)
    rows = []
    with tempfile.TemporaryDirectory(prefix="relaydiff-calib-") as tmp:
        fp32 = get_exporter("onnx").export(component_for("unet_step", device), device, Path(tmp) / "fp32")
        fp32_bytes = fp32.path.stat().st_size
        held = eval_config(relay_step, steps, prompts=eval_prompts)
        sets = {mode: capture(host, device, CalibrationConfig(mode=mode, relay_steps=(relay_step,), steps=steps, prompts=prompts))
                for mode in ("relay", "whole")}
        for scheme, act in SCHEMES.items():
            for mode, cal in sets.items():
                t0 = time.perf_counter()
                art = quantize_onnx(fp32, Path(tmp) / f"{scheme}-{mode}", OnnxInt8Config(activation_type=act), cal)
                figures = relay_parity(host, device, session_runner(art.path), config=held).to_json()
                rows.append({"scheme": scheme, "calibration": mode, "samples": len(cal.for_component("unet_step")),
                             "bytes": art.path.stat().st_size, "seconds": round(time.perf_counter() - t0, 1), **figures})
                say(json.dumps(rows[-1]))
    return {"family": str(family_dir), "variant": variant or "device", "relay_step": relay_step, "steps": steps,
            "calibration_prompts": prompts, "eval_prompts": eval_prompts, "fp32_bytes": fp32_bytes, "rows": rows}
