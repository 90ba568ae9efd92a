"""``relaydiff preset NAME [--out DIR [--materialize]]``: a random-weight architecture preset.

Without ``--out`` it prints the preset's parameter counts, computed on the meta device (no memory).
With ``--out`` it writes the family folder; presets whose weights exceed MATERIALIZE_BYTES at the chosen
dtype (SDXL, SD3.5) also need ``--materialize``, so that nobody fills their disk and memory by accident.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.output import emit
from relaydiff.core.errors import RelaydiffError

MATERIALIZE_BYTES = 4 * 1024**3  # 4 GiB of weights: above this a build needs --materialize


def register(sub: Any) -> None:
    from relaydiff.presets import PRESETS

    p = sub.add_parser("preset", help="a random-weight architecture preset: its parameter counts, or its family folder")
    p.add_argument("name", help=f"preset name: {', '.join(sorted(PRESETS))}")
    p.add_argument("--out", help="output folder (without it: print the parameter counts only)")
    p.add_argument("--materialize", action="store_true",
                   help=f"allow building a preset whose weights exceed {MATERIALIZE_BYTES // 1024**3} GiB")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weight dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_json(p)
    p.set_defaults(func=cmd_preset)


def cmd_preset(args: argparse.Namespace) -> int:
    from relaydiff.presets import build_preset, count_parameters, get_preset

    get_preset(args.name)  # unknown names fail before anything is built
    counts = count_parameters(args.name)
    total = sum(counts.values())
    weight_bytes = total * (2 if args.dtype == "float16" else 4)
    if args.out is None:
        payload = {"preset": args.name, "parameters": counts, "total": total, "dtype": args.dtype, "weight_bytes": weight_bytes}
        lines = [f"preset {args.name!r} (meta device, nothing allocated):"]
        lines += [f"  {k:<20} {v / 1e6:>10.1f} M" for k, v in counts.items()]
        lines.append(f"  {'total':<20} {total / 1e6:>10.1f} M  ({weight_bytes / 1e9:.1f} GB as {args.dtype})")
        emit(args.json, payload, lines)
        return 0
    if weight_bytes > MATERIALIZE_BYTES and not args.materialize:
        raise RelaydiffError(f"preset {args.name!r} has {total / 1e9:.2f}B parameters ({weight_bytes / 1e9:.1f} GB as "
                             f"{args.dtype}); pass --materialize to build it (it needs that much memory and disk)")
    t0 = time.perf_counter()
    out = build_preset(args.name, args.out, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    payload = {"preset": args.name, "out": str(out), "bytes": size, "seconds": round(time.perf_counter() - t0, 2)}
    emit(args.json, payload, [f"wrote preset {args.name!r} to {out} ({size / 1e6:.1f} MB)"])
    return 0
