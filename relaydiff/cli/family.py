"""``relaydiff family init | train | evaluate``: make a family folder from your own pair of diffusers pipelines,
train the embedded family from scratch, or measure a family's accuracy.

``train`` and ``evaluate`` hand their arguments to the training code's own parser (``relaydiff.embedded``),
so ``relaydiff family train --help`` lists exactly its flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.output import emit
from relaydiff.core.errors import CompatibilityError, RelaydiffError


def register(sub: Any) -> None:
    p = sub.add_parser("family", help="model families: init (from a host and a device pipeline folder), train, evaluate")
    actions = p.add_subparsers(dest="family_command", required=True, metavar="{init,train,evaluate,probe}")

    i = actions.add_parser("init", help="build a family folder from two plain diffusers pipeline folders (checked to relay)")
    i.add_argument("--host", required=True, help="host pipeline folder (e.g. stable-diffusion-v1-5): gives the VAE, "
                                                 "text encoder, tokenizer, scheduler and the host UNet")
    i.add_argument("--device", required=True, help="device pipeline folder (e.g. bk-sdm-small): gives the device UNet")
    i.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="an extra device variant from another pipeline folder (repeatable; default: none)")
    i.add_argument("--name", default=None, help="family label in family.json (default: the --out folder's name)")
    i.add_argument("--out", required=True, help="family folder to write (absent or empty)")
    add_json(i)
    i.set_defaults(func=cmd_init)

    t = actions.add_parser("train", add_help=False, help="train the embedded family's weights from scratch "
                                                         "(`relaydiff family train --help` for its flags)")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)

    e = actions.add_parser("evaluate", add_help=False, help="accuracy of a family's host, device and relay on world "
                                                            "prompts (`relaydiff family evaluate --help` for its flags)")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_evaluate)

    pr = actions.add_parser("probe", add_help=False, help="diagnostic probes of a family: VAE round trips, denoising "
                                                          "error by timestep, per-step swaps (`relaydiff family probe --help`)")
    pr.add_argument("rest", nargs=argparse.REMAINDER)
    pr.set_defaults(func=cmd_probe)


def _variants(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RelaydiffError(f"--variant is {spec!r}; expected NAME=DIR (a pipeline folder)")
        if name in out:
            raise RelaydiffError(f"--variant names {name!r} twice")
        out[name] = Path(path)
    return out


def cmd_init(args: argparse.Namespace) -> int:
    """Exit 0 with the family written; 1 when a device cannot relay with the host (every mismatch listed)."""
    from relaydiff.core import family

    variants = _variants(args.variant)
    try:
        out = family.init_family(Path(args.host), Path(args.device), Path(args.out), variants=variants, name=args.name)
    except CompatibilityError as exc:
        fields = exc.to_json()
        emit(args.json, {"ok": False, "error": str(exc), "mismatches": fields},
             [f"refused: {exc}"] + [f"  {m['field']}: host {m['host']!r}, device {m['device']!r}" for m in fields])
        return 1
    ref = family.resolve(out, role="host")
    info = family.family_info(out) or {}
    payload = {"ok": True, "out": str(out), "family_id": family.family_id(ref), "variants": info.get("variants", {}),
               "default_sampler": family.default_sampler(ref)}
    emit(args.json, payload, [f"wrote family {out} (id {payload['family_id']}; variants "
                              + ", ".join(f"{k}={v}" for k, v in payload["variants"].items())
                              + f"; sampler {payload['default_sampler']})"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from relaydiff.embedded.train import main as train_main
    except ImportError as exc:
        raise RelaydiffError(f"family training is not available: {exc}") from None
    return int(train_main(_rest(args)))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from relaydiff.embedded.evaluate import main as evaluate_main

    return int(evaluate_main(_rest(args)))


def cmd_probe(args: argparse.Namespace) -> int:
    from relaydiff.embedded.probes import main as probes_main

    return int(probes_main(_rest(args)))


def _rest(args: argparse.Namespace) -> list[str]:
    """The arguments after ``family train|evaluate`` (without the ``--`` the CLI puts before them)."""
    rest = list(args.rest)
    return rest[1:] if rest[:1] == ["--"] else rest
