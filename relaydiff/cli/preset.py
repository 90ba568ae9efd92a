"""``relaydiff preset NAME --out DIR``: a random-weight architecture preset, written as a family folder."""

from __future__ import annotations

import argparse
import time
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.output import emit


def register(sub: Any) -> None:
    p = sub.add_parser("preset", help="build a random-weight architecture preset as a family folder")
    p.add_argument("name", help="preset name: tiny, sd15-bksdm")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weight dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_json(p)
    p.set_defaults(func=cmd_preset)


def cmd_preset(args: argparse.Namespace) -> int:
    from relaydiff.presets import build_preset

    t0 = time.perf_counter()
    out = build_preset(args.name, args.out, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    payload = {"preset": args.name, "out": str(out), "bytes": size, "seconds": round(time.perf_counter() - t0, 2)}
    emit(args.json, payload, [f"wrote preset {args.name!r} to {out} ({size / 1e6:.1f} MB)"])
    return 0
