"""``relaydiff eval relay | scheduler | distill``: the evaluations, each a subcommand with only its own flags.

- ``eval relay`` sweeps the relay step (RISE Fig. 5): accuracy, PSNR/SSIM and cost vs k;
- ``eval scheduler`` replays the split scheduler (the bandit vs fixed splits) on a measured table;
- ``eval distill`` compares distilled students with the undistilled device half from the same hand-offs.

The library never sees argparse: each command builds its config and calls the library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json, add_pair_args, names
from relaydiff.cli.output import emit
from relaydiff.core.errors import RelaydiffError


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluations: relay (quality and cost vs relay step), scheduler (the split "
                                    "scheduler on a measured table), distill (students vs the device half)")
    what = p.add_subparsers(dest="eval_command", required=True, metavar="{relay,scheduler,distill,cache,preview}")

    r = what.add_parser("relay", help="accuracy, PSNR/SSIM and cost vs relay step (RISE Fig. 5)")
    add_pair_args(r)
    r.add_argument("--prompts", type=int, default=200, help="number of prompts (split over 1/2/3 objects)")
    r.add_argument("--steps", type=int, default=25, help="denoising steps N")
    r.add_argument("--scheduler", default=None, help="sampler (default: the host folder's own scheduler where supported, else ddim)")
    r.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    r.add_argument("--seed", type=int, default=0, help="prompt-sampling seed within the split")
    r.add_argument("--split", default="test", choices=("test", "val"),
                   help="held-out prompts and noise seeds: 'test' (reported figures) or 'val' (model selection and "
                        "tuning); see docs/world.md, Splits")
    r.add_argument("--out-dir", default="out/eval-relay", help="output folder")
    add_json(r, "print the summary as one JSON document, no progress bars")
    r.set_defaults(func=cmd_eval_relay)

    s = what.add_parser("scheduler", help="the bandit vs fixed splits on a measured quality/latency table")
    s.add_argument("--requests", type=int, default=2000, help="requests in the workload")
    s.add_argument("--seed", type=int, default=0, help="workload seed")
    s.add_argument("--table", default=None,
                   help="quality/latency table JSON (default: relaydiff/assets/scheduler_table.json)")
    s.add_argument("--from-relay-report", action="append", default=[], metavar="VARIANT=REPORT",
                   help="build --table from `eval relay` report.json files first (repeat per device variant; default: none)")
    s.add_argument("--state-bytes", type=int, default=None, help="relay state bytes, with --from-relay-report (default: none)")
    s.add_argument("--quality-metric", default="accuracy", choices=("accuracy", "attribute_accuracy"),
                   help="quality column taken from the relay reports")
    s.add_argument("--out-dir", default="out/eval-scheduler", help="output folder")
    add_json(s, "print the report as one JSON document, no progress bars")
    s.set_defaults(func=cmd_eval_scheduler)

    d = what.add_parser("distill", help="distilled students vs the undistilled device half from the same hand-offs")
    d.add_argument("--family", default=None, help="family folder holding the students (default: the embedded family)")
    d.add_argument("--variants", type=names, default=("student",), help="comma list of student variants of the family")
    d.add_argument("--prompts", type=int, default=200, help="number of prompts (split over 1/2/3 objects)")
    d.add_argument("--seed", type=int, default=0, help="prompt-sampling seed")
    d.add_argument("--out-dir", default="out/eval-distill", help="output folder")
    add_json(d, "print the summary as one JSON document, no progress bars")
    d.set_defaults(func=cmd_eval_distill)

    from relaydiff.cache.cli import register_eval as register_eval_cache

    register_eval_cache(what)  # eval cache: budget-aware feature caching (relaydiff.cache)

    from relaydiff.cli.preview import register_eval as register_eval_preview

    register_eval_preview(what)  # eval preview: DiffusionX editing sessions (relaydiff.preview)


def cmd_eval_relay(args: argparse.Namespace) -> int:
    from relaydiff.cli.relay import load_pair, resolve_pair
    from relaydiff.core import family
    from relaydiff.core.diagnose import run_diagnostic
    from relaydiff.core.diagnose import write_outputs as write_diag
    from relaydiff.core.relay import RelayRequest
    from relaydiff.evaluate import EvalConfig, eval_noise_seed, eval_prompts, run_eval, write_outputs

    host_ref, device_ref = resolve_pair(args)
    sampler = args.scheduler or family.default_sampler(host_ref)
    cfg = EvalConfig(prompts=args.prompts, steps=args.steps, sampler=sampler, guidance_scale=args.guidance, seed=args.seed,
                     split=args.split)
    RelayRequest("x", relay_step=0, steps=cfg.steps, sampler=cfg.sampler, guidance_scale=cfg.guidance_scale)  # validate early
    host, device = load_pair(host_ref, device_ref)
    report = run_eval(host, device, cfg, progress=not args.json)
    out_dir = Path(args.out_dir)
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
    def pct(s: dict[str, Any], key: str) -> str:
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
    emit(args.json, payload, lines)
    return 0


def cmd_eval_distill(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.eval_distill import DistillEvalConfig, format_table, run_distill_eval, write_outputs

    root = family.require_family(args.family) if args.family else family.default_family_dir()
    cfg = DistillEvalConfig(variants=tuple(args.variants), prompts=args.prompts, seed=args.seed)
    report = run_distill_eval(root, cfg, progress=not args.json)
    paths = write_outputs(report, Path(args.out_dir))
    emit(args.json, {"config": report["config"], "summary": report["summary"], "files": paths},
         [format_table(report), "wrote " + ", ".join(paths.values())])
    return 0


def _read_reports(specs: list[str]) -> dict[str, dict[str, Any]]:
    reports = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RelaydiffError(f"--from-relay-report is {spec!r}; expected VARIANT=PATH to an eval relay report.json")
        if name in reports:
            raise RelaydiffError(f"--from-relay-report names variant {name!r} twice")
        p = Path(path)
        if not p.is_file():
            raise RelaydiffError(f"eval relay report not found: '{p}'")
        try:
            reports[name] = json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RelaydiffError(f"eval relay report '{p}' is not JSON: {exc}") from None
    return reports


def cmd_eval_scheduler(args: argparse.Namespace) -> int:
    """Run the scheduler evaluation (building the table from relay reports first when asked)."""
    from relaydiff.eval_scheduler import (
        SchedulerEvalConfig,
        load_table,
        run_scheduler_eval,
        table_from_relay_reports,
        write_scheduler_outputs,
    )

    cfg = SchedulerEvalConfig(requests=args.requests, seed=args.seed)
    if args.from_relay_report:
        if args.table is None:
            raise RelaydiffError("--from-relay-report needs --table PATH to write the table to")
        if args.state_bytes is None or args.state_bytes < 0:
            raise RelaydiffError(f"--from-relay-report needs --state-bytes N >= 0 (relaydiff relay --json prints it), got {args.state_bytes!r}")
        table = table_from_relay_reports(_read_reports(args.from_relay_report), state_bytes=args.state_bytes,
                                         quality_metric=args.quality_metric)
        table.save(args.table)
    table = load_table(args.table)
    result = run_scheduler_eval(table, cfg, progress=not args.json)
    paths = write_scheduler_outputs(result, Path(args.out_dir))
    report = result["report"]
    lines = [report["source"], f"{cfg.requests} requests, seed {cfg.seed}; reward = {report['reward']} "
             f"(latency_scale_s {report['latency_scale_s']:.3g})",
             f"{'policy':<32} {'reward':>7} {'exp.':>7} {'quality':>7} {'latency s':>9} {'regret':>8} {'% oracle':>8}"]
    for p in report["policies"]:
        lines.append(f"{p['policy']:<32} {p['reward']:>7.4f} {p['expected_reward']:>7.4f} {p['quality']:>7.3f} "
                     f"{p['latency_s']:>9.3f} {p['regret']:>8.2f} {100 * p['share_of_oracle']:>7.1f}%")
    for name, value in report["targets"].items():
        lines.append(f"target {name}: {value}")
    lines.append("wrote " + ", ".join(paths.values()))
    emit(args.json, {**report, "files": paths}, lines)
    return 0
