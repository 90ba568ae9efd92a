"""``relaydiff edit`` (an editing session: device previews, host refinement) and ``relaydiff preview train``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json, add_pair_args
from relaydiff.cli.service import add_client_link_args, client_link
from relaydiff.cli.output import emit, message
from relaydiff.core.errors import RelaydiffError


DEFAULT_REUSE = 0.6  # fixed strengths when there is no predictor
DEFAULT_REFINE = 0.5


def _strength_or_auto(text: str) -> float | str:
    if text == "auto":
        return "auto"
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
    e.add_argument("--reuse-strength", type=_strength_or_auto, default=None,
                   help="device reuse strength of an edited round in (0, 1], or 'auto' (the predictors'; default: "
                        f"'auto' when there are predictors, else {DEFAULT_REUSE})")
    e.add_argument("--refine-strength", type=_strength_or_auto, default=None,
                   help="host refine strength in (0, 1], or 'auto' (the predictors'; over --host-url the host's own; "
                        f"default: 'auto' when there are predictors or a --host-url, else {DEFAULT_REFINE})")
    e.add_argument("--predictors", default="default",
                   help="strength predictors JSON from `relaydiff preview train`, or 'none' (default: the family's "
                        "preview/predictors.json when it has one)")
    e.add_argument("--no-host", action="store_true", help="do not ask the host: the last preview is the result")
    e.add_argument("--host-url", default=None,
                   help="refine on a running `relaydiff host` at this ws:// or wss:// URL (default: the host model "
                        "in this process); an unreachable host leaves the preview as the result, said so")
    add_client_link_args(e)
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


def _predictors(choice: str | None, root: Path) -> Any:
    """--predictors: 'default' (the family's file, if any), 'none', or a path."""
    from relaydiff.core.strength import load_predictors

    return load_predictors(root, None if choice in (None, "none") else choice)


def _edit_strengths(args: argparse.Namespace, predictors: Any) -> tuple[float | None, float | None]:
    """(reuse, refine) strengths of ``relaydiff edit``: None where a predictor (local, or the host's) decides.

    'auto' needs predictors (or, for the refine strength, a --host-url: the host's); no flag means 'auto'
    when that is possible and the fixed default otherwise.
    """
    reuse, refine = args.reuse_strength, args.refine_strength
    if reuse == "auto" and predictors is None:
        raise RelaydiffError("--reuse-strength auto needs strength predictors: --predictors FILE (from `relaydiff preview train`)")
    if refine == "auto" and predictors is None and args.host_url is None:
        raise RelaydiffError("--refine-strength auto needs strength predictors (--predictors FILE) or a --host-url whose host has them")
    if reuse is None:
        reuse = "auto" if predictors is not None else DEFAULT_REUSE
    if refine is None:
        refine = "auto" if predictors is not None or args.host_url is not None else DEFAULT_REFINE
    return (None if reuse == "auto" else reuse), (None if refine == "auto" else refine)


def cmd_edit(args: argparse.Namespace) -> int:
    from relaydiff.cli.relay import load_pair, resolve_pair
    from relaydiff.preview.session import EditSession, LinkRefiner, LocalRefiner, Refiner, write_session

    rounds = _read_rounds(args.prompts)
    if args.no_host and args.host_url:
        raise RelaydiffError(f"--no-host and --host-url {args.host_url!r} contradict each other; pass one")
    link = client_link(args, args.host_url) if args.host_url else None
    host_ref, device_ref = resolve_pair(args)
    predictors = _predictors(args.predictors, device_ref.root)
    reuse, refine_s = _edit_strengths(args, predictors)
    config = _config(args, reuse_strength=reuse, refine_strength=refine_s)
    if link is None:
        host, device = load_pair(host_ref, device_ref)
    else:  # the host's model is on the host: load only the device's
        from relaydiff.core import family

        host, device = None, family.load(device_ref)
    session = EditSession(device, config, predictors=predictors)
    for text in rounds:
        r = session.preview(text)
        if not args.json:
            message(f"round {r.index + 1}: {'reused at ' + format(r.strength, '.2f') if r.reused else 'from noise'}, "
                    f"{r.device_calls} device UNet evals, {r.device_seconds:.2f} s")
    refiner: Refiner | None = None
    if link is not None:
        from relaydiff.link import DeviceCapabilities
        from relaydiff.runtime.backends import TorchBackend

        token, tls, link_config = link
        backend = TorchBackend(model=device)
        last = session.rounds[-1]
        speed = min(max(last.device_calls / max(last.device_seconds, 1e-6), 1e-3), 10_000.0)
        caps = DeviceCapabilities(("torch",), backend.bundle_id, backend.bundle_sha256, speed)
        refiner = LinkRefiner(args.host_url, auth_token=token, family_id=device.family_id, capabilities=caps,
                              config=link_config, ssl=tls)
    elif not args.no_host:
        assert host is not None
        refiner = LocalRefiner(host, predictors, device=device)
    session.refiner = refiner
    final = session.final()
    summary = write_session(session, final, Path(args.out))
    where = f"the host at {args.host_url}" if args.host_url else "the host model in this process"
    lines = [f"{len(rounds)} rounds previewed on the device; final from the {final.source}"
             + (f" ({where}) at strength {final.strength:.2f} ({final.host_calls} host UNet evals)" if final.source == "host" else ""),
             *([final.note] if final.note else []), f"written to {args.out}"]
    emit(args.json, {**summary, "out": str(args.out), "host_url": args.host_url}, lines)
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
    e.add_argument("--predictors", default="default",
                   help="predictors JSON (adds the predictor policy), or 'none' (default: the family's "
                        "preview/predictors.json when it has one)")
    e.add_argument("--out-dir", default="out/eval-preview", help="output folder")
    add_json(e)
    e.set_defaults(func=cmd_eval_preview)


def cmd_eval_preview(args: argparse.Namespace) -> int:
    from relaydiff.cli.relay import load_pair, resolve_pair
    from relaydiff.preview.evaluate import PreviewEvalConfig, run_preview_eval, write_report

    if args.sessions < 1:
        raise RelaydiffError(f"--sessions {args.sessions!r}; expected a positive integer")
    host_ref, device_ref = resolve_pair(args)
    predictors = _predictors(args.predictors, device_ref.root)
    if args.reuse_strength == "auto" and predictors is None:
        raise RelaydiffError("--reuse-strength auto needs strength predictors: --predictors FILE")
    reuse = None if args.reuse_strength == "auto" else args.reuse_strength
    config = PreviewEvalConfig(sessions=args.sessions, split=args.split, seed=args.session_seed,
                               edit=_config(args, reuse_strength=reuse))
    host, device = load_pair(host_ref, device_ref)
    report = run_preview_eval(host, device, config, predictors, progress=not args.json)
    paths = write_report(report, Path(args.out_dir))
    lines = [f"{report['sessions']} sessions ({args.split} split), N={args.steps}, preview {args.preview_steps} steps"]
    for name, s in report["policies"].items():
        lines.append(f"{name:26s} acc {s['prompt_accuracy']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]  host evals "
                     f"{s['host_unet_evals_per_session']:.0f}  device evals {s['device_unet_evals_per_session']:.0f}")
    lines.append(f"written to {paths['report']}")
    emit(args.json, {k: v for k, v in report.items() if k != "rows"} | paths, lines)
    return 0
