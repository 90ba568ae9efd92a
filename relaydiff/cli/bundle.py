"""``relaydiff bundle build`` and ``relaydiff bundle verify``: the command-line layer over ``relaydiff.export.bundle``.

The library never sees argparse: each command builds a config and calls the library. ``bundle verify`` exits
1 when the bundle fails a check.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json
from relaydiff.cli.common import names as _names
from relaydiff.cli.output import emit, message

log = logging.getLogger(__name__)

TARGETS = ("onnx", "coreml", "executorch")  # mirrors relaydiff.export.bundle.TARGETS (that module is imported lazily)
PRECISIONS = ("fp32", "int8")


def _float_modules(value: str | None) -> tuple[str, ...] | None:
    """--executorch-float: None (the default set), () for 'none', else the comma list."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    return tuple(m.strip() for m in value.split(",") if m.strip())


def register(sub: Any) -> None:
    """Add ``bundle`` with its ``build`` and ``verify`` actions to the ``relaydiff`` subparsers."""
    p = sub.add_parser("bundle", help="mobile bundles: `bundle build` exports + quantizes the device half; `bundle verify` checks one")
    actions = p.add_subparsers(dest="bundle_command", required=True)

    b = actions.add_parser("build", help="export the device half per target and precision, with manifest.json and DIR.zip")
    b.add_argument("--family", help="family folder with a host and a device variant (default: the embedded family, "
                                    "or the tiny preset); a plain pipeline folder is refused")
    b.add_argument("--targets", type=_names, default=("onnx",), help=f"comma list of {', '.join(TARGETS)}")
    b.add_argument("--precision", type=_names, default=("fp32",), help=f"comma list of {', '.join(PRECISIONS)}")
    b.add_argument("--components", type=_names, default=None, help="comma list (default unet_step,vae_decoder,text_encoder)")
    b.add_argument("--device-variant", default=None,
                   help="device UNet variant of the family, e.g. 'student' (a distilled student: one conditional pass per jump)")
    b.add_argument("--relay-step", type=int, default=None,
                   help="hand-off step k: INT8 calibration covers device steps [k, N) (default 8, or the student's)")
    b.add_argument("--steps", type=int, default=None, help="denoising steps N (default 25, or the student's)")
    b.add_argument("--calibration-prompts", type=int, default=48,
                   help="world prompts of the relay-aware calibration set")
    b.add_argument("--coreml-target", default="iOS18", choices=("iOS17", "iOS18"), help="CoreML deployment target")
    b.add_argument("--onnx-int8", default="w8a16", choices=("w8a16", "w8a8"),
                   help="ONNX static INT8 of unet_step: int8 weights, 16- or 8-bit activations")
    b.add_argument("--executorch-float", default=None, metavar="MODULES",
                   help="ExecuTorch INT8: comma list of module paths left in float, 'none' to quantize all "
                        "(default unet.up_blocks.-1,unet.conv_norm_out,unet.conv_out: the full-resolution tail)")
    b.add_argument("--cache", action="store_true",
                   help="also export unet_step_full/unet_step_cached (fp32) and the family's cache policy, so the device "
                        "runtime honours a cache budget (docs/cache.md)")
    b.add_argument("--cache-mechanism", default="reuse", choices=("reuse", "forecast"),
                   help="which committed policy goes in the bundle with --cache (default reuse)")
    b.add_argument("--no-zip", action="store_true", help="do not write DIR.zip")
    b.add_argument("--out", required=True, help="bundle folder (empty or absent)")
    add_json(b, "print the manifest as one JSON document on stdout, no progress bars (library output goes to a log file)")
    b.set_defaults(func=cmd_build)

    v = actions.add_parser("verify", help="recheck a bundle's hashes, schema and (where the runtime exists) parity")
    v.add_argument("dir", help="bundle folder")
    v.add_argument("--no-parity", action="store_true", help="hashes and schema only")
    add_json(v, "print the report as one JSON document")
    v.set_defaults(func=cmd_verify)


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
    from relaydiff.core.family import default_family_dir, require_family
    from relaydiff.export.bundle import COMPONENTS, BundleConfig, build

    family_dir = require_family(args.family, needed="a device variant to export (and a host for calibration)") \
        if args.family else default_family_dir()
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
        cache=args.cache,
        cache_mechanism=args.cache_mechanism,
    )
    manifest = build(config, progress=not args.json, log=None if args.json else log.info)
    lines = [f"{a['target']:<10} {a['precision']:<5} {a['component']:<16} {a['size']:>10} B  {a['file']}"
             for a in manifest["artifacts"]]
    lines += [f"skipped {s['target']}/{s['precision']}/{s.get('component', '')}: {s['reason']}" for s in manifest["skipped"]]
    lines.append(f"wrote {config.out}/manifest.json" + ("" if args.no_zip else f" and {config.out}.zip"))
    emit(args.json, manifest, lines)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from relaydiff.export.bundle import verify

    report = verify(Path(args.dir), parity=not args.no_parity)
    lines = []
    for row in report.parity:
        status = "not run: " + row["reason"] if not row.get("run") else ("ok" if row["passed"] else "FAILED")
        lines.append(f"parity {row['target']}/{row['precision']}/{row['component']}: {status}")
    if not args.json:
        for p in report.problems:
            message(f"problem: {p}")
    lines.append(f"{'OK' if report.ok else 'FAILED'}: {report.checked_files} files checked in {report.bundle}")
    emit(args.json, report.to_json(), lines)
    return 0 if report.ok else 1
