"""``relaydiff quantize compare | sensitivity``: INT8 studies on a trained family.

- ``compare``: relay-aware vs whole-trajectory calibration of the ONNX ``unet_step`` (W8A16 and W8A8),
  measured on held-out relays (:func:`relaydiff.quantize.compare.compare`);
- ``sensitivity``: which modules of the device UNet step ExecuTorch's W8A8 hurts, leaving one set in float
  at a time (:func:`relaydiff.quantize.sensitivity.probe`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.output import emit

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("quantize", help="INT8 studies: compare (relay-aware vs whole-trajectory calibration), "
                                        "sensitivity (ExecuTorch W8A8 per-module probes)")
    actions = p.add_subparsers(dest="quantize_command", required=True, metavar="{compare,sensitivity}")

    c = actions.add_parser("compare", help="relay-aware vs whole-trajectory INT8 calibration of the ONNX unet_step")
    _add_common(c)
    c.add_argument("--prompts", type=int, default=4, help="calibration prompts per set")
    c.add_argument("--eval-prompts", type=int, default=3, help="held-out relays")
    add_json(c)
    c.set_defaults(func=cmd_compare)

    s = actions.add_parser("sensitivity", help="leave one module set in float at a time under ExecuTorch W8A8 and measure")
    _add_common(s)
    s.add_argument("--probe", action="append", default=None, metavar="MODULES",
                   help="comma list of module paths kept float together ('none': quantize all); repeatable "
                        "(default: nothing float, each child of the UNet, and the default float set)")
    add_json(s)
    s.set_defaults(func=cmd_sensitivity)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default=None, help="family folder (default: the embedded family)")
    p.add_argument("--variant", default=None, help="device variant (default: the family's default device)")
    p.add_argument("--relay-step", type=int, default=8, help="hand-off step k")
    p.add_argument("--steps", type=int, default=25, help="denoising steps N")


def _family(args: argparse.Namespace) -> Path:
    from relaydiff.core import family

    return family.require_family(args.family) if args.family else family.default_family_dir()


def cmd_compare(args: argparse.Namespace) -> int:
    from relaydiff.quantize.compare import compare

    report = compare(_family(args), args.variant, args.relay_step, args.steps, args.prompts, args.eval_prompts,
                     log=None if args.json else log.info)
    lines = [f"{'scheme':<7} {'calibration':<12} {'samples':>7} {'denoiser max abs':>16} {'worst dB':>8} {'image worst dB':>14} {'mean dB':>7}"] + [
        f"{r['scheme']:<7} {r['calibration']:<12} {r['samples']:>7} {r['denoiser_max_abs']:>16.4f} {r['denoiser_psnr_db']:>8.2f} "
        f"{r['image_psnr_db']:>14.2f} {r['image_psnr_db_mean']:>7.2f}" for r in report["rows"]]
    emit(args.json, report, lines)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from relaydiff.quantize.sensitivity import probe

    probes = None if args.probe is None else [() if m == "none" else tuple(s for s in m.split(",") if s) for m in args.probe]
    report = probe(_family(args), args.variant, args.relay_step, args.steps, probes, progress=not args.json)
    lines = [f"{'float modules':60s} {'params':>7s} {'denoiser':>9s} {'last step':>9s} {'image worst/mean':>17s}"]
    for r in report["rows"]:
        name = ", ".join(r["float"]) or "(none: all W8A8)"
        lines.append(f"{name[:60]:60s} {r['float_parameter_share']:7.1%} {r['denoiser_psnr_db']:8.2f}  "
                     f"{r['last_step_psnr_db']:8.2f}  {r['image_psnr_db']:7.2f} / {r['image_psnr_db_mean']:.2f}")
    emit(args.json, report, lines)
    return 0
