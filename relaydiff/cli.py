"""The ``relaydiff`` command line. ``main(argv) -> int`` parses, builds a config and calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from relaydiff import bench_cli, bundle_cli, service_cli
from relaydiff.core.errors import RelaydiffError


def _quiet_libraries() -> None:
    """Silence diffusers/transformers info chatter so that output is ours (and --json stays one object)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", help="family folder with host and device variants (default: the embedded family)")
    p.add_argument("--host", help="host model folder (pipeline or family folder); overrides --family for the host")
    p.add_argument("--device", help="device model folder (pipeline or family folder); overrides --family for the device")
    p.add_argument("--host-variant", help="family variant to use as host (default: the family's default_host)")
    p.add_argument("--device-variant", help="family variant to use as device (default: the family's default_device)")


def _add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--steps", type=int, default=25, help="denoising steps N (default 25)")
    p.add_argument("--relay-step", type=int, default=None, help="hand-off step k in [0, N]; default 30%% of N")
    p.add_argument("--scheduler", default="ddim", help="sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_sde")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--json", action="store_true", help="print one JSON object and no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaydiff", description="Relay text-to-image diffusion from a host model to a device model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("relay", help="run one relayed generation and write the image")
    _add_pair_args(p)
    _add_request_args(p)
    p.add_argument("--out", default="relay.png", help="output PNG path (default relay.png)")
    p.add_argument("--state-out", help="also write the relay state handed over at step k (safetensors bytes)")

    p = sub.add_parser("resume", help="device half only: finish a saved relay state and decode it")
    p.add_argument("--state", required=True, help="relay state file written by `relaydiff relay --state-out`")
    p.add_argument("--device", help="device model folder (default: the embedded family's device variant)")
    p.add_argument("--device-variant", help="family variant to use as device")
    p.add_argument("--out", default="resume.png", help="output PNG path")
    p.add_argument("--json", action="store_true", help="print one JSON object and no progress bars")

    p = sub.add_parser("diagnose", help="latent diagnostic: ||x_t|| per step for host-only, relay and device-only")
    _add_pair_args(p)
    _add_request_args(p)
    p.add_argument("--out-dir", default="diagnostic", help="folder for diagnostic.json/.csv/.png")

    p = sub.add_parser("preset", help="build a random-weight architecture preset as a family folder")
    p.add_argument("name", help="preset name: tiny, sd15-bksdm")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="check that a host and a device model can relay")
    _add_pair_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="evaluations: `eval relay` sweeps the relay step (RISE Fig. 5); `eval scheduler` replays the "
                       "split scheduler; `eval distill` compares distilled students with the undistilled device half")
    p.add_argument("what", choices=("relay", "scheduler", "distill"),
                   help="relay: accuracy, PSNR/SSIM and cost vs relay step; scheduler: bandit vs fixed splits on a measured table; "
                        "distill: students vs the undistilled device half from the same hand-offs")
    _add_pair_args(p)
    p.add_argument("--prompts", type=int, default=200, help="number of prompts (split over 1/2/3 objects)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps N")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", help="relay: held-out prompts and noise seeds, 'test' (reported figures, "
                   "default) or 'val' (model selection and tuning); see docs/world.md, Splits")
    p.add_argument("--out-dir", default=None, help="output folder (default out/eval-relay, out/eval-scheduler or out/eval-distill)")
    p.add_argument("--variants", default="student", help="distill: comma list of student variants of the family (default student)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object and no progress bars")
    p.add_argument("--requests", type=int, default=2000, help="scheduler: requests in the workload")
    p.add_argument("--table", default=None, help="scheduler: quality/latency table JSON (default relaydiff/assets/scheduler_table.json)")
    p.add_argument("--from-relay-report", action="append", default=[], metavar="VARIANT=REPORT",
                   help="scheduler: build --table from `eval relay` report.json files first (repeat per device variant)")
    p.add_argument("--state-bytes", type=int, default=None, help="scheduler: relay state bytes, with --from-relay-report")
    p.add_argument("--quality-metric", default="accuracy", choices=("accuracy", "attribute_accuracy"),
                   help="scheduler: quality column taken from the relay reports (default: prompt accuracy)")

    p = sub.add_parser("family", help="the embedded model family (train it from scratch)")
    p.add_argument("action", choices=("train",), help="train: reproduce the embedded family's weights")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the action (see `relaydiff family train --help`)")
    service_cli.add_parsers(sub)  # relaydiff host, relaydiff device
    bundle_cli.add_parsers(sub)  # relaydiff bundle build|verify
    bench_cli.add_parsers(sub)  # relaydiff bench device|link

    p = sub.add_parser("distill", help="relay-aware step + guidance distillation of the device UNet into a few-step student")
    p.add_argument("--family", default=None, help="family folder (default: the embedded family); the student is written into it")
    p.add_argument("--relay-step", type=int, default=8, help="relay step k the student is distilled for (default 8)")
    p.add_argument("--student-steps", type=int, default=4, help="student DDIM jumps M (default 4)")
    p.add_argument("--steps", type=int, default=25, help="teacher grid steps N (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale baked into the student (default 5)")
    p.add_argument("--minutes", type=float, default=25.0, help="training budget in minutes (default 25)")
    p.add_argument("--max-updates", type=int, default=100_000, help="stop after this many student updates (default 100000)")
    p.add_argument("--method", choices=("progressive", "lcm"), default="progressive",
                   help="progressive: regress the teacher's jump endpoints; lcm: latent consistency distillation (default progressive)")
    p.add_argument("--variant", default=None,
                   help="family variant name of the student (default 'student', or 'student_lcm' for --method lcm)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an earlier run")
    p.add_argument("--json", action="store_true", help="print the student description as JSON, no progress bars")

    p = sub.add_parser("demo", help="the relay end to end: bundle, host and device on loopback under changing networks")
    p.add_argument("--family", default=None, help="family folder (default: the embedded family)")
    p.add_argument("--out-dir", default="out/demo", help="bundle, report.json and grid.png go here (default out/demo)")
    p.add_argument("--precision", default="fp32", help="device bundle precision: fp32 or int8 (default fp32)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps N (default 25)")
    p.add_argument("--quality-preference", type=float, default=0.6, help="the user's quality weight in [0, 1] (default 0.6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="rebuild the bundle even when a matching one exists")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of the table")
    return parser


def _resolve_pair(args: argparse.Namespace) -> tuple[Any, Any]:
    from relaydiff.core import family

    fam = args.family
    if fam is None and (args.host is None or args.device is None):
        fam = str(family.default_family_dir())
    host = family.resolve(args.host or fam, args.host_variant, role="host")
    device = family.resolve(args.device or fam, args.device_variant, role="device")
    family.check_pair(host, device)
    return host, device


def _request(args: argparse.Namespace) -> Any:
    from relaydiff.core.relay import RelayRequest

    k = args.relay_step if args.relay_step is not None else round(0.3 * args.steps)
    return RelayRequest(
        prompt=args.prompt, relay_step=k, steps=args.steps, sampler=args.scheduler, guidance_scale=args.guidance,
        seed=args.seed, negative_prompt=args.negative_prompt,
    )


def _load_pair(host_ref: Any, device_ref: Any) -> tuple[Any, Any]:
    from relaydiff.core import family

    host = family.load(host_ref)
    device = family.load(device_ref, share_with=host)
    return host, device


def _emit(args: argparse.Namespace, payload: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload))
    else:
        print("\n".join(lines))


def cmd_relay(args: argparse.Namespace) -> int:
    from PIL import Image

    from relaydiff.core.relay import relay

    req = _request(args)
    host_ref, device_ref = _resolve_pair(args)
    t0 = time.perf_counter()
    host, device = _load_pair(host_ref, device_ref)
    load_s = time.perf_counter() - t0
    res = relay(host, device, req, progress=not args.json)
    if args.state_out:
        Path(args.state_out).write_bytes(res.handoff)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(res.images[0]).save(out)
    payload = {
        "image": str(out),
        "host": host_ref.label,
        "device": device_ref.label,
        "family_id": host.family_id,
        "prompt": req.prompt,
        "steps": req.steps,
        "relay_step": req.relay_step,
        "scheduler": req.sampler,
        "guidance": req.guidance_scale,
        "seed": req.seed,
        "host_seconds": round(res.host_seconds, 4),
        "device_seconds": round(res.device_seconds, 4),
        "relay_state_bytes": res.state_bytes,
        "load_seconds": round(load_s, 3),
    }
    _emit(args, payload, [
        f"wrote {out}  ({req.prompt!r}, {req.sampler}, k={req.relay_step}/{req.steps}, seed {req.seed})",
        f"host   {res.host_seconds:8.3f} s   ({host_ref.label})",
        f"device {res.device_seconds:8.3f} s   ({device_ref.label})",
        f"relay state {res.state_bytes} bytes",
    ])
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from PIL import Image

    from relaydiff.core import family
    from relaydiff.core.relay import decode, resume
    from relaydiff.core.state import MAX_STATE_BYTES, RelayState

    path = Path(args.state)
    if not path.is_file():
        raise RelaydiffError(f"relay state file not found: '{path}'")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise RelaydiffError(f"relay state file '{path}' is {path.stat().st_size} bytes; the cap is {MAX_STATE_BYTES}")
    state = RelayState.from_bytes(path.read_bytes())
    ref = family.resolve(args.device or family.default_family_dir(), args.device_variant, role="device")
    model = family.load(ref)
    t0 = time.perf_counter()
    final = resume(model, state, progress=not args.json)
    image = decode(model, final.latents)[0]
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out)
    payload = {"image": str(out), "device": ref.label, "relay_step": state.step_index, "steps": state.num_inference_steps,
               "device_seconds": round(secs, 4), "prompt": state.prompt}
    _emit(args, payload, [f"wrote {out}  (resumed at step {state.step_index}/{state.num_inference_steps} on {ref.label}, {secs:.3f} s)"])
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from relaydiff.core.diagnose import run_diagnostic, write_outputs

    req = _request(args)
    host_ref, device_ref = _resolve_pair(args)
    host, device = _load_pair(host_ref, device_ref)
    diag = run_diagnostic(host, device, req, progress=not args.json)
    paths = write_outputs(diag, Path(args.out_dir))
    payload = {**diag.to_json(), "files": paths}
    _emit(args, payload, [
        f"max relative deviation of ||x_t|| after the hand-off: {100 * diag.max_deviation_after_handoff:.2f}%",
        f"final latent relative L2 distance relay vs host-only: {diag.final_latent_rel_l2:.4f}",
        "wrote " + ", ".join(paths.values()),
    ])
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    from relaydiff.presets import build_preset

    t0 = time.perf_counter()
    out = build_preset(args.name, args.out, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    payload = {"preset": args.name, "out": str(out), "bytes": size, "seconds": round(time.perf_counter() - t0, 2)}
    _emit(args, payload, [f"wrote preset {args.name!r} to {out} ({size / 1e6:.1f} MB)"])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from relaydiff.core import family

    host, device = _resolve_pair(args)
    payload = {"ok": True, "host": host.label, "device": device.label, "family_id": family.family_id(host)}
    _emit(args, payload, [f"ok: {host.label} can relay to {device.label} (family {payload['family_id']})"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from relaydiff.core.diagnose import run_diagnostic
    from relaydiff.core.diagnose import write_outputs as write_diag
    from relaydiff.core.relay import RelayRequest
    from relaydiff.evaluate import EvalConfig, eval_noise_seed, eval_prompts, run_eval, write_outputs

    if args.what == "scheduler":
        from relaydiff.scheduler_cli import cmd_eval_scheduler

        return cmd_eval_scheduler(args)
    if args.what == "distill":
        return _eval_distill(args)
    cfg = EvalConfig(prompts=args.prompts, steps=args.steps, sampler=args.scheduler, guidance_scale=args.guidance, seed=args.seed,
                     split=args.split)
    RelayRequest("x", relay_step=0, steps=cfg.steps, sampler=cfg.sampler, guidance_scale=cfg.guidance_scale)  # validate early
    host_ref, device_ref = _resolve_pair(args)
    host, device = _load_pair(host_ref, device_ref)
    report = run_eval(host, device, cfg, progress=not args.json)
    out_dir = Path(args.out_dir or "out/eval-relay")
    paths = write_outputs(report, out_dir)
    prompt = next((p for p in eval_prompts(cfg.prompts, cfg.seed, cfg.split) if " of " in p or " above " in p or " below " in p),
                  eval_prompts(1, cfg.seed, cfg.split)[0])
    k = round(0.3 * cfg.steps)
    diag = None
    if device.student is None:  # the per-step norm diagnostic compares equal-length trajectories; a student jumps
        diag = run_diagnostic(host, device, RelayRequest(prompt, relay_step=k, steps=cfg.steps, sampler=cfg.sampler,
                                                         guidance_scale=cfg.guidance_scale,
                                                         seed=eval_noise_seed(cfg.split, cfg.seed, 0)))
        paths.update({f"diagnostic.{k_}": v for k_, v in write_diag(diag, out_dir / "diagnostic").items()})
    payload = {"host": host_ref.label, "device": device_ref.label, "config": report["config"],
               "summary": report["summary"], "diagnostic": None if diag is None else {"prompt": prompt, "relay_step": k,
               "max_deviation_after_handoff": diag.max_deviation_after_handoff,
               "final_latent_rel_l2": diag.final_latent_rel_l2}, "files": paths}
    def pct(s: dict, key: str) -> str:
        if key not in s:
            return f"{'-':>17}"
        lo, hi = s[key + "_ci95"]
        return f"{100 * s[key]:>5.1f} [{100 * lo:>4.0f},{100 * hi:>4.0f}]"

    lines = [f"{cfg.split} split, {cfg.prompts} prompts; accuracies in % with 95% bootstrap CIs over prompts",
             f"{'k':>3} {'k/N':>5} {'acc':>17} {'1obj':>17} {'2obj':>17} {'3obj':>17} {'vs host':>17} {'PSNR':>7} "
             f"{'SSIM':>6} {'host s':>7} {'dev s':>7}"]
    for s in report["summary"]:
        diff = s.get("accuracy_minus_host")
        lines.append(
            f"{s['k']:>3} {s['fraction']:>5.2f} " + " ".join(pct(s, key) for key in ("accuracy", "accuracy_1obj",
                                                                                     "accuracy_2obj", "accuracy_3obj"))
            + (f" {100 * diff[0]:>+5.1f} [{100 * diff[1]:>+4.0f},{100 * diff[2]:>+4.0f}]" if diff else f" {'-':>17}")
            + (f" {s['psnr_vs_host_db']:>7.2f}" if s["psnr_vs_host_db"] is not None else f" {'same':>7}")
            + f" {s['ssim_vs_host']:>6.3f} {s['host_seconds']:>7.3f} {s['device_seconds']:>7.3f}"
        )
        lines.append("      failed checks: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["failed_checks"].items()))
    lines.append(f"latent diagnostic ({prompt!r}, k={k}): max ||x_t|| deviation after hand-off "
                 f"{100 * diag.max_deviation_after_handoff:.2f}%" if diag is not None
                 else "latent diagnostic skipped: the device is a distilled student (its trajectory has fewer steps)")
    lines.append("wrote " + ", ".join(paths.values()))
    _emit(args, payload, lines)
    return 0


def _eval_distill(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.eval_distill import DistillEvalConfig, format_table, run_distill_eval, write_outputs

    root = Path(args.family) if args.family else family.default_family_dir()
    cfg = DistillEvalConfig(variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()), prompts=args.prompts, seed=args.seed)
    report = run_distill_eval(root, cfg, progress=not args.json)
    paths = write_outputs(report, Path(args.out_dir or "out/eval-distill"))
    _emit(args, {"config": report["config"], "summary": report["summary"], "files": paths},
          [format_table(report), "wrote " + ", ".join(paths.values())])
    return 0


def cmd_family(args: argparse.Namespace) -> int:
    try:
        from relaydiff.embedded.train import main as train_main
    except ImportError as exc:
        raise RelaydiffError(f"family training is not available: {exc}") from None
    return int(train_main(list(args.rest)))


def cmd_distill(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.quantize.distill import DistillConfig, distill

    root = Path(args.family) if args.family else family.default_family_dir()
    variant = args.variant or ("student" if args.method == "progressive" else f"student_{args.method}")
    if not variant.replace("_", "").isalnum():
        raise RelaydiffError(f"variant name {variant!r} must be letters, digits and underscores")
    config = DistillConfig(family=root, relay_step=args.relay_step, student_steps=args.student_steps, steps=args.steps,
                           guidance_scale=args.guidance, minutes=args.minutes, max_updates=args.max_updates, method=args.method, variant=variant,
                           subfolder=f"unet_{variant}")
    info = distill(config, resume=not args.no_resume, progress=not args.json, log=None if args.json else print)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"student: {info['student_unet_passes']} UNet passes after the relay step instead of {info['teacher_unet_passes']}; "
              f"variant {config.variant!r} in {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relaydiff.demo import DemoConfig, run_demo

    config = DemoConfig(out_dir=Path(args.out_dir), family=Path(args.family) if args.family else None,
                        precision=args.precision, steps=args.steps, quality_preference=args.quality_preference,
                        seed=args.seed, rebuild=args.rebuild)
    report = run_demo(config, log=None if args.json else print)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"network emulation: {report['network_emulation']}")
        print(f"device backend: {report['device_backend']}; bundle {'reused' if report['bundle_reused'] else 'built'}: {report['bundle']}")
        print(f"wrote {report['grid_png']} and {Path(args.out_dir) / 'report.json'}")
    return 0


COMMANDS = {"demo": cmd_demo, "distill": cmd_distill, "relay": cmd_relay, "resume": cmd_resume, "diagnose": cmd_diagnose, "preset": cmd_preset, "check": cmd_check, "eval": cmd_eval, "family": cmd_family, **service_cli.COMMANDS, "bundle": bundle_cli.cmd_bundle, "bench": bench_cli.cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relaydiff`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except RelaydiffError as exc:
        print(f"relaydiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relaydiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
