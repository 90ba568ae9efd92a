"""``relaydiff bundle build`` and ``relaydiff bundle verify``: the command-line layer over ``relaydiff.export.bundle``.

The library never sees argparse: each command builds a config and calls the library. ``bundle build`` exits
1 when an artifact fails its gates (unless ``--allow-failing``); ``bundle verify`` exits 1 when the bundle fails a
check or holds an artifact marked ``failed``.
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

MAX_PROMPTS = 10_000  # --calibration-prompts FILE: lines kept
MAX_PROMPT_CHARS = 1000  # per prompt (the tokenizer truncates far earlier)
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

    b = actions.add_parser("build", help="export the device half per target and precision, gate every artifact, write manifest.json and DIR/DIR.zip")
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
    b.add_argument("--calibration-prompts", default="48", metavar="N|FILE",
                   help="the relay-aware calibration set: a number of world prompts (default 48), or a UTF-8 text file "
                        f"with your model's prompts, one a line (blank lines and '#' comments skipped; at most {MAX_PROMPTS})")
    b.add_argument("--calibration-sampler", default=None, metavar="NAME",
                   help="sampler of the calibration relays (default: the family's scheduler)")
    b.add_argument("--calibration-guidance", type=float, default=None, metavar="G",
                   help="CFG scale of the calibration relays, > 1 (default: the family's, else 5)")
    b.add_argument("--allow-failing", action="store_true",
                   help="keep artifacts that fail their gates, marked 'failed' in the manifest (the runtime refuses them); "
                        "without it such a build exits 1 and writes nothing")
    b.add_argument("--accuracy-prompts", type=int, default=None, metavar="N",
                   help="prompts of the INT8 prompt-accuracy gate (default 100; trained families only)")
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
    b.add_argument("--no-zip", action="store_true", help="do not write DIR/DIR.zip")
    b.add_argument("--denylist", default=None, metavar="FILE",
                   help="ship a prompt denylist (one word or phrase a line; the runtime refuses prompts that contain one)")
    b.add_argument("--layout", default="relaydiff", choices=("relaydiff", "optimum"),
                   help="optimum: also write DIR/optimum/, loadable by optimum's ORTStableDiffusionPipeline")
    b.add_argument("--no-safety-checker", action="store_true",
                   help="leave out the family's safety checker (exported by default when the family has one)")
    b.add_argument("--out", required=True, help="bundle folder (empty or absent)")
    add_json(b, "print the manifest as one JSON document on stdout, no progress bars (library output goes to a log file)")
    b.set_defaults(func=cmd_build)

    v = actions.add_parser("verify", help="recheck a bundle's hashes, schema and (where the runtime exists) parity")
    v.add_argument("dir", help="bundle folder")
    v.add_argument("--no-parity", action="store_true", help="hashes and schema only")
    v.add_argument("--trusted-key", help="Ed25519 public key PEM: the bundle must carry its signature (manifest.sig)")
    add_json(v, "print the report as one JSON document")
    v.set_defaults(func=cmd_verify)

    k = actions.add_parser("keygen", help="make an Ed25519 key pair to sign bundles with (bundle-signing.{key,pub}.pem)")
    k.add_argument("--out", required=True, help="folder to write the two PEM files into (never overwritten)")
    add_json(k, "print the key paths as one JSON object")
    k.set_defaults(func=cmd_keygen)

    s = actions.add_parser("sign", help="sign a bundle that verifies: an Ed25519 signature of manifest.sha256 in manifest.sig")
    s.add_argument("dir", help="bundle folder")
    s.add_argument("--key", required=True, help="private key PEM (relaydiff bundle keygen)")
    add_json(s, "print the signature's path as one JSON object")
    s.set_defaults(func=cmd_sign)


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


def calibration_prompts(value: str) -> int | tuple[str, ...]:
    """--calibration-prompts: a positive count of world prompts, or the prompts of a text file (one a line).

    Raises:
        RelaydiffError: neither a positive number nor a readable UTF-8 file with 1..MAX_PROMPTS prompts.
    """
    from relaydiff.core.errors import RelaydiffError

    text = value.strip()
    if text.isdigit():
        if int(text) < 1:
            raise RelaydiffError(f"--calibration-prompts: {value!r} must be a positive number of world prompts or a prompt file")
        return int(text)
    path = Path(value)
    if not path.is_file():
        raise RelaydiffError(f"--calibration-prompts: {value!r} is neither a number of world prompts nor a file")
    if path.stat().st_size > MAX_PROMPTS * (MAX_PROMPT_CHARS + 1) * 4:
        raise RelaydiffError(f"--calibration-prompts: '{path}' is {path.stat().st_size} bytes; too large for {MAX_PROMPTS} prompts")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise RelaydiffError(f"--calibration-prompts: '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise RelaydiffError(f"--calibration-prompts: '{path}' holds no prompts (one a line; blank lines and '#' comments are skipped)")
    if len(prompts) > MAX_PROMPTS:
        raise RelaydiffError(f"--calibration-prompts: '{path}' holds {len(prompts)} prompts; at most {MAX_PROMPTS}")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise RelaydiffError(f"--calibration-prompts: prompt {long + 1} of '{path}' has {len(prompts[long])} characters; "
                             f"at most {MAX_PROMPT_CHARS}")
    return tuple(prompts)


def _accuracy_check() -> Any:
    """The prompt-accuracy gate's scorer: relaydiff.scorer on relaydiff.evaluate's test prompts (seed 0)."""
    from relaydiff.evaluate import eval_prompts
    from relaydiff.export.bundle import AccuracyCheck
    from relaydiff.runtime.gates import ACCURACY_PROMPTS
    from relaydiff.scorer import score

    return AccuracyCheck(tuple(eval_prompts(ACCURACY_PROMPTS, 0)), lambda image, prompt: bool(score(image, prompt).correct))


def cmd_build(args: argparse.Namespace) -> int:
    from relaydiff.core.family import default_family_dir, require_family
    from relaydiff.export.bundle import COMPONENTS, BundleConfig, build
    from relaydiff.runtime.gates import ACCURACY_PROMPTS

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
        calibration_prompts=calibration_prompts(args.calibration_prompts),
        calibration_sampler=args.calibration_sampler,
        calibration_guidance=args.calibration_guidance,
        allow_failing=args.allow_failing,
        accuracy_prompts=ACCURACY_PROMPTS if args.accuracy_prompts is None else args.accuracy_prompts,
        coreml_target=args.coreml_target,
        zip=not args.no_zip,
        cache=args.cache,
        cache_mechanism=args.cache_mechanism,
        safety_checker=not args.no_safety_checker,
        layout=args.layout,
        denylist=Path(args.denylist) if args.denylist else None,
    )
    manifest = build(config, progress=not args.json, log=None if args.json else log.info, accuracy=_accuracy_check())
    lines = [f"{a['target']:<10} {a['precision']:<5} {a['component']:<16} {a['size']:>10} B  {a['status']:<10}  {a['file']}"
             for a in manifest["artifacts"]]
    lines += [f"skipped {s['target']}/{s['precision']}/{s.get('component', '')}: {s['reason']}" for s in manifest["skipped"]]
    failed = [a for a in manifest["artifacts"] if a["status"] == "failed"]
    lines += [f"FAILED (kept by --allow-failing; the runtime refuses it): {a['target']}/{a['precision']}/{a['component']}" for a in failed]
    from relaydiff.export.bundle import archive_path

    lines.append("safety checker: " + ("exported" if manifest.get("safety_checker") else "none (the family has none, or "
                                                                                 "--no-safety-checker)")
                 + (f"; denylist of {manifest['denylist']['entries']} entries" if manifest.get("denylist") else "; no denylist"))
    lines.append(f"wrote {config.out}/manifest.json" + ("" if args.no_zip else f" and {archive_path(config.out)}"))
    emit(args.json, manifest, lines)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from relaydiff.export.bundle import verify

    from relaydiff.runtime.gates import Gate

    report = verify(Path(args.dir), parity=not args.no_parity, trusted_key=args.trusted_key)
    lines = []
    for row in report.parity:
        status = "not run: " + row["reason"] if not row.get("run") else ("ok" if row["passed"] else "FAILED")
        lines.append(f"parity {row['target']}/{row['precision']}/{row['component']}: {status}")
    for row in report.gates:
        lines.append(f"gates {row['artifact']}: {row['status']}")
        lines += [f"    {Gate.from_json(g).describe()}" for g in row["gates"]]
    if not args.json:
        for p in report.problems:
            message(f"problem: {p}")
        for name in report.failed_artifacts:
            message(f"gate failed: {name} (built with --allow-failing; the runtime refuses it)")
    good = report.ok and report.gates_ok
    lines.append(f"{'OK' if good else 'FAILED'}: {report.checked_files} files checked in {report.bundle}"
                 + ("" if report.gates_ok else f"; {len(report.failed_artifacts)} artifacts failed their gates"))
    emit(args.json, report.to_json(), lines)
    return 0 if good else 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from relaydiff.runtime.signing import keygen

    private, public = keygen(args.out)
    emit(args.json, {"private_key": str(private), "public_key": str(public)},
         [f"private key {private} (keep it secret)", f"public key {public} (give it to devices: --trusted-key)"])
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from relaydiff.runtime.signing import sign

    sig = sign(Path(args.dir), args.key)
    emit(args.json, {"signature": str(sig)}, [f"signed: {sig}"])
    return 0
