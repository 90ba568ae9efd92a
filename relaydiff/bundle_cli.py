"""``relaydiff bundle build`` and ``relaydiff bundle verify``: the command-line layer over ``relaydiff.export.bundle``.

Hooked into ``relaydiff.cli`` with ``add_parsers(sub)`` and ``COMMANDS["bundle"] = cmd_bundle``. The
library never sees argparse: each command builds a config and calls the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = ("onnx", "coreml", "executorch")  # mirrors relaydiff.export.bundle.TARGETS (that module is imported lazily)
PRECISIONS = ("fp32", "int8")


def _float_modules(value: str | None) -> tuple[str, ...] | None:
    """--executorch-float: None (the default set), () for 'none', else the comma list."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    return tuple(m.strip() for m in value.split(",") if m.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_parsers(sub: Any) -> None:
    """Add ``bundle`` with its ``build`` and ``verify`` actions to the ``relaydiff`` subparsers."""
    p = sub.add_parser("bundle", help="mobile bundles: `bundle build` exports + quantizes the device half; `bundle verify` checks one")
    actions = p.add_subparsers(dest="bundle_command", required=True)

    b = actions.add_parser("build", help="export the device half per target and precision, with manifest.json and DIR.zip")
    b.add_argument("--family", help="family folder (default: the embedded family, or the tiny preset)")
    b.add_argument("--targets", type=_names, default=("onnx",), help=f"comma list of {', '.join(TARGETS)} (default onnx)")
    b.add_argument("--precision", type=_names, default=("fp32",), help=f"comma list of {', '.join(PRECISIONS)} (default fp32)")
    b.add_argument("--components", type=_names, default=None, help="comma list (default unet_step,vae_decoder,text_encoder)")
    b.add_argument("--device-variant", default=None,
                   help="device UNet variant of the family, e.g. 'student' (a distilled student: one conditional pass per jump)")
    b.add_argument("--relay-step", type=int, default=None,
                   help="hand-off step k: INT8 calibration covers device steps [k, N) (default 8, or the student's)")
    b.add_argument("--steps", type=int, default=None, help="denoising steps N (default 25, or the student's)")
    b.add_argument("--calibration-prompts", type=int, default=48,
                   help="world prompts of the relay-aware calibration set (default 48)")
    b.add_argument("--coreml-target", default="iOS18", choices=("iOS17", "iOS18"))
    b.add_argument("--onnx-int8", default="w8a16", choices=("w8a16", "w8a8"),
                   help="ONNX static INT8 of unet_step: int8 weights, 16- or 8-bit activations (default w8a16)")
    b.add_argument("--executorch-float", default=None, metavar="MODULES",
                   help="ExecuTorch INT8: comma list of module paths left in float, 'none' to quantize all "
                        "(default unet.up_blocks.-1,unet.conv_norm_out,unet.conv_out: the full-resolution tail)")
    b.add_argument("--no-zip", action="store_true", help="do not write DIR.zip")
    b.add_argument("--out", required=True, help="bundle folder (empty or absent)")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON and no progress bars")

    v = actions.add_parser("verify", help="recheck a bundle's hashes, schema and (where the runtime exists) parity")
    v.add_argument("dir", help="bundle folder")
    v.add_argument("--no-parity", action="store_true", help="hashes and schema only")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")


def cmd_bundle(args: argparse.Namespace) -> int:
    """Dispatch ``relaydiff bundle <action>``; returns the exit status (RelaydiffError propagates to the CLI)."""
    return {"build": cmd_build, "verify": cmd_verify}[args.bundle_command](args)


def _relay_grid(family_dir: Path, variant: str | None, relay_step: int | None, steps: int | None) -> tuple[int, int]:
    """(k, N): as given, else a student variant's own, else (8, 25)."""
    if variant is not None and (relay_step is None or steps is None):
        from relaydiff.core import family
        from relaydiff.core.student import read_student

        ref = family.resolve(family_dir, variant, role="device")
        info = read_student(ref.root / ref.unet_subfolder)
        if info is not None:
            return (info.relay_step if relay_step is None else relay_step, info.steps if steps is None else steps)
    return (8 if relay_step is None else relay_step, 25 if steps is None else steps)


def cmd_build(args: argparse.Namespace) -> int:
    from relaydiff.core.family import default_family_dir
    from relaydiff.export.bundle import COMPONENTS, BundleConfig, build

    family_dir = Path(args.family) if args.family else default_family_dir()
    relay_step, steps = _relay_grid(family_dir, args.device_variant, args.relay_step, args.steps)
    config = BundleConfig(
        family=family_dir,
        out=Path(args.out),
        targets=args.targets,
        precisions=args.precision,
        components=args.components or COMPONENTS,
        relay_step=relay_step,
        steps=steps,
        device_variant=args.device_variant,
        onnx_int8=args.onnx_int8,
        executorch_float=_float_modules(args.executorch_float),
        calibration_prompts=args.calibration_prompts,
        coreml_target=args.coreml_target,
        zip=not args.no_zip,
    )
    log = None if args.json else (lambda m: print(m, file=sys.stderr))
    manifest = build(config, progress=not args.json, log=log)
    if args.json:
        print(json.dumps(manifest, sort_keys=True))
    else:
        for a in manifest["artifacts"]:
            print(f"{a['target']:<10} {a['precision']:<5} {a['component']:<13} {a['size']:>10} B  {a['file']}")
        for s in manifest["skipped"]:
            print(f"skipped {s['target']}/{s['precision']}/{s.get('component', '')}: {s['reason']}")
        print(f"wrote {config.out}/manifest.json" + ("" if args.no_zip else f" and {config.out}.zip"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from relaydiff.export.bundle import verify

    report = verify(Path(args.dir), parity=not args.no_parity)
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    else:
        for row in report.parity:
            status = "not run: " + row["reason"] if not row.get("run") else ("ok" if row["passed"] else "FAILED")
            print(f"parity {row['target']}/{row['precision']}/{row['component']}: {status}")
        for p in report.problems:
            print(f"problem: {p}", file=sys.stderr)
        print(f"{'OK' if report.ok else 'FAILED'}: {report.checked_files} files checked in {report.bundle}")
    return 0 if report.ok else 1
