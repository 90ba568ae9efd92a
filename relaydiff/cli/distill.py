"""``relaydiff distill``: relay-aware step + guidance distillation of the device UNet into a few-step student."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.output import emit
from relaydiff.core.errors import RelaydiffError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("distill", help="relay-aware step + guidance distillation of the device UNet into a few-step student")
    p.add_argument("--family", default=None, help="family folder (default: the embedded family); the student is written into it")
    p.add_argument("--relay-step", type=int, default=8, help="relay step k the student is distilled for")
    p.add_argument("--student-steps", type=int, default=4, help="student DDIM jumps M")
    p.add_argument("--steps", type=int, default=25, help="teacher grid steps N")
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale baked into the student")
    p.add_argument("--minutes", type=float, default=25.0, help="training budget in minutes")
    p.add_argument("--max-updates", type=int, default=100_000, help="stop after this many student updates")
    p.add_argument("--method", choices=("progressive", "lcm"), default="progressive",
                   help="progressive: regress the teacher's jump endpoints; lcm: latent consistency distillation")
    p.add_argument("--variant", default=None,
                   help="family variant name of the student (default 'student', or 'student_lcm' for --method lcm)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an earlier run")
    add_json(p, "print the student description as one JSON document, no progress bars")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.quantize.distill import DistillConfig, distill

    root = family.require_family(args.family) if args.family else family.default_family_dir()
    variant = args.variant or ("student" if args.method == "progressive" else f"student_{args.method}")
    if not variant.replace("_", "").isalnum():
        raise RelaydiffError(f"variant name {variant!r} must be letters, digits and underscores")
    config = DistillConfig(family=root, relay_step=args.relay_step, student_steps=args.student_steps, steps=args.steps,
                           guidance_scale=args.guidance, minutes=args.minutes, max_updates=args.max_updates, method=args.method, variant=variant,
                           subfolder=f"unet_{variant}")
    info = distill(config, resume=not args.no_resume, progress=not args.json, log=None if args.json else log.info)
    emit(args.json, info, [f"student: {info['student_unet_passes']} UNet passes after the relay step instead of "
                           f"{info['teacher_unet_passes']}; variant {config.variant!r} in {root}"])
    return 0
