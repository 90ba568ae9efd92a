"""``relaydiff edit`` (an editing session: device previews, host refinement) and ``relaydiff preview train``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json, add_pair_args
from relaydiff.cli.output import emit, message
from relaydiff.core.errors import RelaydiffError


def _strength_or_auto(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"strength {text!r} is not a number in (0, 1] or 'auto'") from None


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20, help="the host's full schedule N")
    p.add_argument("--preview-steps", type=int, default=5, help="the device's few-step preview schedule")
    p.add_argument("--scheduler", default="ddim", help="sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, pndm, unipc")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every round")


def register(sub: Any) -> None:
    e = sub.add_parser("edit", help="an editing session: a device preview per round, the host refines the final one")
    add_pair_args(e)
    e.add_argument("--prompts", required=True, help="file with one prompt per line (the rounds; the last is final), "
                                                    "or '-' to read rounds from the terminal until an empty line")
    e.add_argument("--out", required=True, help="output folder: round_<i>.png, final.png, contact_sheet.png, session.json")
    _config_args(e)
    e.add_argument("--reuse-strength", type=_strength_or_auto, default=0.6,
                   help="device reuse strength of an edited round in (0, 1], or 'auto' (needs --predictors)")
    e.add_argument("--refine-strength", type=_strength_or_auto, default=0.5,
                   help="host refine strength in (0, 1], or 'auto' (needs --predictors)")
    e.add_argument("--predictors", default=None, help="strength predictors JSON from `relaydiff preview train` (default: none)")
    e.add_argument("--no-host", action="store_true", help="do not ask the host: the last preview is the result")
    add_json(e)
    e.set_defaults(func=cmd_edit)

    p = sub.add_parser("preview", help="preview/refine strength predictors (DiffusionX)")
    what = p.add_subparsers(dest="preview_command", required=True, metavar="{train}")
    t = what.add_parser("train", help="fit the refine and reuse strength predictors on the train split, margins on val")
    add_pair_args(t)
    _config_args(t)
    t.add_argument("--minutes", type=float, default=10.0, help="time budget of the measurements")
    t.add_argument("--min-samples", type=int, default=4, help="train and val pairs measured at least, whatever the budget")
    t.add_argument("--out", default="out/preview/predictors.json", help="where the predictors JSON goes")
    add_json(t)
    t.set_defaults(func=cmd_preview_train)


def _config(args: argparse.Namespace, **extra: Any) -> Any:
    from relaydiff.preview.session import EditConfig

    return EditConfig(steps=args.steps, preview_steps=args.preview_steps, sampler=args.scheduler,
                      guidance_scale=args.guidance, seed=args.seed, **extra)


def _read_rounds(source: str) -> list[str]:
    import sys

    if source == "-":
        lines = []
        for line in sys.stdin:
            if not line.strip():
                break
            lines.append(line.strip())
    else:
        path = Path(source)
        if not path.is_file():
            raise RelaydiffError(f"--prompts file not found: '{path}'")
        lines = path.read_text().splitlines()
    rounds = [line.strip() for line in lines]
    for i, text in enumerate(rounds):
        if not text:
            raise RelaydiffError(f"--prompts round {i + 1} is empty; expected one non-empty prompt per line")
    if not rounds:
        raise RelaydiffError(f"--prompts {source!r} holds no rounds; expected one prompt per line")
    return rounds


def cmd_edit(args: argparse.Namespace) -> int:
    from relaydiff.cli.relay import load_pair, resolve_pair
    from relaydiff.preview.session import EditSession, LocalRefiner, write_session

    rounds = _read_rounds(args.prompts)
    config = _config(args, reuse_strength=args.reuse_strength, refine_strength=args.refine_strength)
    predictors = None
    if args.predictors:
        from relaydiff.preview.predictor import StrengthPredictors

        predictors = StrengthPredictors.load(Path(args.predictors))
    elif args.reuse_strength is None or args.refine_strength is None:
        raise RelaydiffError("a strength of 'auto' needs --predictors FILE (from `relaydiff preview train`)")
    host_ref, device_ref = resolve_pair(args)
    host, device = load_pair(host_ref, device_ref)
    refiner = None if args.no_host else LocalRefiner(host, predictors, device=device)
    session = EditSession(device, config, refiner=refiner, predictors=predictors)
    for text in rounds:
        r = session.preview(text)
        if not args.json:
            message(f"round {r.index + 1}: {'reused at ' + format(r.strength, '.2f') if r.reused else 'from noise'}, "
                    f"{r.device_calls} device UNet evals, {r.device_seconds:.2f} s")
    final = session.final()
    summary = write_session(session, final, Path(args.out))
    lines = [f"{len(rounds)} rounds previewed on the device; final from the {final.source}"
             + (f" at strength {final.strength:.2f} ({final.host_calls} host UNet evals)" if final.source == "host" else ""),
             *([final.note] if final.note else []), f"written to {args.out}"]
    emit(args.json, {**summary, "out": str(args.out)}, lines)
    return 0


def cmd_preview_train(args: argparse.Namespace) -> int:
    from relaydiff.cli.relay import load_pair, resolve_pair
    from relaydiff.preview.train import train_predictors

    if not args.minutes > 0:
        raise RelaydiffError(f"--minutes {args.minutes!r}; expected a positive number")
    if args.min_samples < 2:
        raise RelaydiffError(f"--min-samples {args.min_samples!r}; expected at least 2")
    config = _config(args)
    host_ref, device_ref = resolve_pair(args)
    host, device = load_pair(host_ref, device_ref)
    t0 = time.perf_counter()
    predictors = train_predictors(host, device, minutes=args.minutes, config=config, seed=args.seed,
                                  min_samples=args.min_samples, progress=not args.json)
    out = Path(args.out)
    predictors.save(out)
    tr = predictors.training
    emit(args.json, {**predictors.to_json(), "out": str(out), "wall_s": round(time.perf_counter() - t0, 1)},
         [f"{tr['train_samples']} train / {tr['val_samples']} val pairs; refine margin {predictors.refine.margin}, "
          f"reuse margin {predictors.reuse.margin}", f"val refine: {tr['refine_val']}", f"val reuse: {tr['reuse_val']}",
          f"written to {out}"])
    return 0


def register_eval(what: Any) -> None:
    """``eval preview``: the editing-session policies (host every round, device only, preview + host/refine)."""
    e = what.add_parser("preview", help="editing sessions: host every round vs device only vs preview + host refine")
    add_pair_args(e)
    _config_args(e)
    e.add_argument("--sessions", type=int, default=12, help="editing sessions of 3-6 rounds")
    e.add_argument("--split", default="test", choices=("test", "val"), help="split of the sessions' final prompts")
    e.add_argument("--session-seed", type=int, default=0, help="session-drawing seed")
    e.add_argument("--reuse-strength", type=_strength_or_auto, default=0.6, help="device reuse strength, or 'auto'")
    e.add_argument("--predictors", default=None, help="predictors JSON (adds the predictor policy; default: none)")
    e.add_argument("--out-dir", default="out/eval-preview", help="output folder")
    add_json(e)
    e.set_defaults(func=cmd_eval_preview)


def cmd_eval_preview(args: argparse.Namespace) -> int:
    from relaydiff.cli.relay import load_pair, resolve_pair
    from relaydiff.preview.evaluate import PreviewEvalConfig, run_preview_eval, write_report

    if args.sessions < 1:
        raise RelaydiffError(f"--sessions {args.sessions!r}; expected a positive integer")
    predictors = None
    if args.predictors:
        from relaydiff.preview.predictor import StrengthPredictors

        predictors = StrengthPredictors.load(Path(args.predictors))
    elif args.reuse_strength is None:
        raise RelaydiffError("--reuse-strength auto needs --predictors FILE")
    config = PreviewEvalConfig(sessions=args.sessions, split=args.split, seed=args.session_seed,
                               edit=_config(args, reuse_strength=args.reuse_strength))
    host, device = load_pair(*resolve_pair(args))
    report = run_preview_eval(host, device, config, predictors, progress=not args.json)
    paths = write_report(report, Path(args.out_dir))
    lines = [f"{report['sessions']} sessions ({args.split} split), N={args.steps}, preview {args.preview_steps} steps"]
    for name, s in report["policies"].items():
        lines.append(f"{name:26s} acc {s['prompt_accuracy']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]  host evals "
                     f"{s['host_unet_evals_per_session']:.0f}  device evals {s['device_unet_evals_per_session']:.0f}")
    lines.append(f"written to {paths['report']}")
    emit(args.json, {k: v for k, v in report.items() if k != "rows"} | paths, lines)
    return 0
