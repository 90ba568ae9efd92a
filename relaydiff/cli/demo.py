"""``relaydiff demo``: the relay end to end (bundle, host and device on loopback under changing networks)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.output import emit

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the relay end to end: bundle, host and device on loopback under changing networks")
    p.add_argument("--family", default=None, help="family folder (default: the embedded family)")
    p.add_argument("--out-dir", default="out/demo", help="bundle, report.json and grid.png go here")
    p.add_argument("--precision", default="fp32", help="device bundle precision: fp32 or int8")
    p.add_argument("--steps", type=int, default=25, help="denoising steps N")
    p.add_argument("--quality-preference", type=float, default=0.6, help="the user's quality weight in [0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the requests' noise")
    p.add_argument("--rebuild", action="store_true", help="rebuild the bundle even when a matching one exists")
    add_json(p, "print the report as one JSON document instead of the table")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.demo import DemoConfig, run_demo

    if args.family is not None:
        family.require_family(args.family)
    config = DemoConfig(out_dir=Path(args.out_dir), family=Path(args.family) if args.family else None,
                        precision=args.precision, steps=args.steps, quality_preference=args.quality_preference,
                        seed=args.seed, rebuild=args.rebuild)
    # the demo's own rows are its output; per-link records of the host and device show only with --verbose
    quiet = [logging.getLogger(name) for name in ("relaydiff.link", "relaydiff.host", "relaydiff.runtime")]
    levels = [logger.level for logger in quiet]
    if not getattr(args, "verbose", False):
        for logger in quiet:
            logger.setLevel(logging.WARNING)
    try:
        report = run_demo(config, log=None if args.json else log.info)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    emit(args.json, report, [
        f"network emulation: {report['network_emulation']}",
        f"device backend: {report['device_backend']}; bundle {'reused' if report['bundle_reused'] else 'built'}: {report['bundle']}",
        f"wrote {report['grid_png']} and {Path(args.out_dir) / 'report.json'}",
    ])
    return 0
