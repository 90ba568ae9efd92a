"""``relaydiff eval scheduler``: the command-line layer over ``relaydiff.eval_scheduler``.

Dispatched from ``relaydiff.cli.cmd_eval`` (``eval`` shares one parser with ``eval relay``). The
library never sees argparse: this builds a :class:`SchedulerEvalConfig` and calls the library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from relaydiff.core.errors import RelaydiffError


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
    out_dir = Path(args.out_dir or "out/eval-scheduler")
    paths = write_scheduler_outputs(result, out_dir)
    report = result["report"]
    if args.json:
        print(json.dumps({**report, "files": paths}))
        return 0
    lines = [report["source"], f"{cfg.requests} requests, seed {cfg.seed}; reward = {report['reward']} "
             f"(latency_scale_s {report['latency_scale_s']:.3g})",
             f"{'policy':<32} {'reward':>7} {'exp.':>7} {'quality':>7} {'latency s':>9} {'regret':>8} {'% oracle':>8}"]
    for p in report["policies"]:
        lines.append(f"{p['policy']:<32} {p['reward']:>7.4f} {p['expected_reward']:>7.4f} {p['quality']:>7.3f} "
                     f"{p['latency_s']:>9.3f} {p['regret']:>8.2f} {100 * p['share_of_oracle']:>7.1f}%")
    for name, value in report["targets"].items():
        lines.append(f"target {name}: {value}")
    lines.append("wrote " + ", ".join(paths.values()))
    print("\n".join(lines))
    return 0
