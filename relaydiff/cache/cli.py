"""``relaydiff cache train`` and ``relaydiff eval cache``: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any



def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default=None, help="family folder (default: the embedded family)")
    p.add_argument("--mechanism", default="reuse", help="reuse or forecast (default reuse)")
    p.add_argument("--cache-branch", type=int, default=0, help="skip branch of the split, 0 = shallowest (default 0)")
    p.add_argument("--out", default=None, help="policy stem: writes OUT.json and OUT.safetensors "
                                               "(default: <family>/cache_policy/<mechanism>)")
    p.add_argument("--minutes", type=float, default=20.0, help="total wall-time budget over all runs (default 20)")
    p.add_argument("--max-updates", type=int, default=100_000, help="stop after this many policy updates")
    p.add_argument("--prompts", type=int, default=24, help="training prompts (default 24)")
    p.add_argument("--relay-steps", type=_ints, default=(0, 4, 6, 8, 10, 12, 16), help="hand-off points k trained on")
    p.add_argument("--batch", type=int, default=8, help="schedules sampled per update (default 8)")
    p.add_argument("--group", type=int, default=4, help="schedules per budget in an update (default 4)")
    p.add_argument("--baseline", choices=("loo", "moving"), default="loo",
                   help="REINFORCE baseline: leave-one-out within a budget group (default) or a moving average per (k, B)")
    p.add_argument("--attribute-weight", type=float, default=None,
                   help="weight of the scorer's attribute accuracy in the reward (PSNR counts 1 per 10 dB; default 0.1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an earlier run")
    p.add_argument("--json", action="store_true", help="print the policy config as one JSON object")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default=None, help="family folder (default: the embedded family)")
    p.add_argument("--prompts", type=int, default=60, help="evaluation prompts (default 60)")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="prompts and noise seeds of the world's val split (selection) or test split (reported figures; default)")
    p.add_argument("--seed", type=int, default=0, help="prompt-set index within the split")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--relay-steps", type=_ints, default=(8,), help="hand-off points k (default 8)")
    p.add_argument("--fractions", type=_floats, default=None, help="budgets as fractions of N - k (default 1,.8,.6,.5,.4,.3,.2)")
    p.add_argument("--budgets", type=_ints, default=(), help="explicit budgets B in [1, N - k] (instead of --fractions)")
    p.add_argument("--mechanisms", type=_names, default=("reuse", "forecast"))
    p.add_argument("--schedules", type=_names, default=("uniform", "heuristic", "learned"))
    p.add_argument("--cache-branch", type=int, default=0)
    p.add_argument("--policy-dir", default=None, help="folder of <mechanism>.json policies (default <family>/cache_policy)")
    p.add_argument("--latency-prompts", type=int, default=3)
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out-dir", default="out/eval-cache")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object and no progress bars")


def register(sub: Any) -> None:
    """Register ``relaydiff cache train`` on the main CLI's subparsers."""
    p = sub.add_parser("cache", help="budget-aware feature caching on the device: `cache train` trains the learned schedule")
    what = p.add_subparsers(dest="cache_command", required=True, metavar="{train}")
    t = what.add_parser("train", help="REINFORCE-train the caching-schedule policy (time-budgeted, resumable)")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)


def register_eval(what: Any) -> None:
    """Register ``relaydiff eval cache`` on the ``eval`` group's subparsers."""
    e = what.add_parser("cache", help="quality and cost of cached device halves per budget and schedule")
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)


def _family(path: str | None) -> Path:
    from relaydiff.core import family

    return Path(path) if path else family.default_family_dir()


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from relaydiff.cache.train import TrainConfig, train

    torch.set_num_threads(max(1, args.threads))
    root = _family(args.family)
    out = Path(args.out) if args.out else root / "cache_policy" / args.mechanism
    cfg = TrainConfig(out=out, family=root, mechanism=args.mechanism, cache_branch=args.cache_branch, minutes=args.minutes,
                      max_updates=args.max_updates, prompts=args.prompts, relay_steps=tuple(args.relay_steps),
                      batch=args.batch, group=args.group, baseline=args.baseline, seed=args.seed,
                      **({} if args.attribute_weight is None else {"attribute_weight": args.attribute_weight}))
    from relaydiff.cli.output import emit, message

    info = train(cfg, resume=not args.no_resume, log_fn=None if args.json else message)
    t = info["training"]
    emit(args.json, info, [f"policy ({info['mechanism']}): {t['updates']} updates, {t['episodes']} episodes, "
                           f"{t['wall_s']:.0f} s; wrote " + ", ".join(info["files"])])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from relaydiff.cache.evaluate import DEFAULT_FRACTIONS, CacheEvalConfig, run_cache_eval, write_outputs
    from relaydiff.core import family

    torch.set_num_threads(max(1, args.threads))
    root = _family(args.family)
    cfg = CacheEvalConfig(prompts=args.prompts, seed=args.seed, split=args.split, steps=args.steps, guidance_scale=args.guidance,
                          relay_steps=tuple(args.relay_steps), fractions=tuple(args.fractions or DEFAULT_FRACTIONS),
                          budgets=tuple(args.budgets), mechanisms=tuple(args.mechanisms), schedules=tuple(args.schedules),
                          cache_branch=args.cache_branch, policy_dir=args.policy_dir, latency_prompts=args.latency_prompts,
                          latency_repeats=args.latency_repeats)
    host = family.load(family.resolve(root, role="host"))
    device = family.load(family.resolve(root, role="device"), share_with=host)
    report = run_cache_eval(host, device, cfg, progress=not args.json)
    paths = write_outputs(report, Path(args.out_dir))
    from relaydiff.cli.output import emit

    payload = {"config": report["config"], "flops": report["flops"], "latency": report["latency"],
               "summary": report["summary"], "comparisons": report["comparisons"], "files": paths}
    lines = [f"{'k':>3} {'mech':>8} {'schedule':>9} {'B':>3} {'B/m':>5} {'acc':>6} {'d acc vs unc [95% CI]':>24} {'PSNR':>6} "
             f"{'SSIM':>6} {'FLOPs':>6} {'time':>6}"]
    for s in report["summary"]:
        ci = s["accuracy_minus_uncached_ci"]
        lines.append(f"{s['k']:>3} {s['mechanism']:>8} {s['schedule']:>9} {s['budget']:>3} {s['fraction']:>5.2f} {100 * s['accuracy']:>5.1f}% "
              f"{100 * s['accuracy_minus_uncached']:>+6.1f} [{100 * ci[0]:+5.1f}, {100 * ci[1]:+5.1f}]     {s['psnr_db']:>6.2f} "
              f"{s['ssim']:>6.3f} {s.get('flops_ratio_vs_uncached', 1.0):>6.3f} {s.get('latency_ratio_vs_uncached') or 1.0:>6.3f}")
    for c in report["comparisons"]:
        ci = c["psnr_diff_ci"]
        lines.append(f"k={c['k']} {c['mechanism']} B={c['budget']}: {c['a']} - {c['b']} PSNR {c['psnr_diff_db']:+.2f} dB "
              f"[{ci[0]:+.2f}, {ci[1]:+.2f}]")
    lines.append("wrote " + ", ".join(paths.values()))
    emit(args.json, payload, lines)
    return 0
