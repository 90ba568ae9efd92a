"""Relay-aware vs whole-trajectory INT8 calibration of the ONNX ``unet_step``, on a trained family.

    python -m relaydiff.quantize.compare [--family DIR] [--variant device|student] [--relay-step 8] [--steps 25] [--json]

For each activation width (W8A16, W8A8) and each calibration set (``mode="relay"``: device steps [k, N)
after real host hand-offs; ``mode="whole"``: device-only trajectories [0, N)), the fp32 ONNX export of the
device UNet is quantized with onnxruntime's static QDQ and measured on held-out relays
(:func:`relaydiff.quantize.parity.relay_parity`, prompt seed 1000): denoiser error on every device step and
the final-image PSNR of the whole device half against fp32 torch. The calibration sets have the same number
of prompts; the whole-trajectory one therefore holds N/(N-k) times more samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
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


def main(argv: list[str] | None = None) -> int:
    from relaydiff.core import family

    p = argparse.ArgumentParser(prog="python -m relaydiff.quantize.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default=None, help="family folder (default: the embedded family)")
    p.add_argument("--variant", default=None, help="device variant (default: the family's device)")
    p.add_argument("--relay-step", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--prompts", type=int, default=4, help="calibration prompts per set")
    p.add_argument("--eval-prompts", type=int, default=3, help="held-out relays")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    def make() -> dict[str, Any]:
        root = Path(args.family) if args.family else family.default_family_dir()
        return compare(root, args.variant, args.relay_step, args.steps, args.prompts, args.eval_prompts,
                       log=None if args.json else (lambda m: print(m, file=sys.stderr)))

    def table(report: dict[str, Any]) -> list[str]:
        return [f"{'scheme':<7} {'calibration':<12} {'samples':>7} {'denoiser max abs':>16} {'worst dB':>8} {'image worst dB':>14} {'mean dB':>7}"] + [
            f"{r['scheme']:<7} {r['calibration']:<12} {r['samples']:>7} {r['denoiser_max_abs']:>16.4f} {r['denoiser_psnr_db']:>8.2f} "
            f"{r['image_psnr_db']:>14.2f} {r['image_psnr_db_mean']:>7.2f}" for r in report["rows"]]

    return report_cli(make, args.json, table)


def report_cli(make: Callable[[], dict[str, Any]], as_json: bool, table: Callable[[dict[str, Any]], list[str]]) -> int:
    """Run ``make`` (library chatter sent to stderr), print its report as JSON or as ``table`` lines; a
    RelaydiffError is one line on stderr and exit status 2."""
    from relaydiff.core.errors import RelaydiffError

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the exporters' and quantizer's chatter; stdout is the report
            report = make()
    except RelaydiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if as_json else "\n".join(table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
