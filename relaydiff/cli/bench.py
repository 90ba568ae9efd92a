"""``relaydiff bench device | cache | link | attack | cluster``: the command-line layer over the benchmarks
(``relaydiff.export.bench``, ``relaydiff.host.bench``, ``relaydiff.host.attack``, ``relaydiff.host.cluster_bench``).
The library never sees argparse.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from relaydiff.cli.output import result

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add ``bench`` with its sub-commands (``device``, ``cache``, ``link``, ``attack``, ``cluster``) to the ``relaydiff`` subparsers."""
    p = sub.add_parser("bench", help="benchmarks: `bench device` times a bundle's artifacts beside torch; `bench link` the link and host "
                                     "throughput; `bench attack` the host under abuse; `bench cluster` Ray Serve replicas")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)

    d = bench_sub.add_parser("device", help="size, load time and per-call latency of a bundle's artifacts vs torch fp32")
    d.add_argument("--bundle", required=True, help="bundle folder written by `relaydiff bundle build`")
    d.add_argument("--repeats", type=int, default=20, help="timed calls per artifact; the median is reported")
    d.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    d.add_argument("--threads", type=int, default=1, help="intra-op threads for onnxruntime and torch alike")
    d.add_argument("--family", help="family folder of the torch reference (default: the one recorded in the bundle)")
    d.add_argument("--no-relay", action="store_true", help="skip the device-half relay timing")
    d.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs (one fresh process per file)")
    d.add_argument("--components", help="comma-separated components to measure (default: every component of the bundle)")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.set_defaults(func=cmd_device)

    c = bench_sub.add_parser("cache", help="a cached step vs a full step (ONNX, ExecuTorch), and the budgeted device half")
    c.add_argument("--bundle", required=True, help="bundle folder built with `relaydiff bundle build --cache`")
    c.add_argument("--repeats", type=int, default=20, help="timed calls of each graph, alternating; the median is reported")
    c.add_argument("--warmup", type=int, default=2, help="untimed calls of each graph before timing")
    c.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    c.add_argument("--budget-fraction", type=float, default=0.5, help="budget of the timed device half, share of N - k")
    c.add_argument("--relay-repeats", type=int, default=3, help="device halves timed per setting")
    c.add_argument("--no-relay", action="store_true", help="skip the end-to-end device-half timing")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_cache)

    n = bench_sub.add_parser("link", help="hand-off overhead vs ping RTT; host throughput host-only vs relay with many devices")
    n.add_argument("--rounds", type=int, default=200, help="hand-offs and pings timed for the overhead")
    n.add_argument("--family", help="family for the throughput runs (default: the embedded family)")
    n.add_argument("--devices", type=int, default=32, help="concurrent devices")
    n.add_argument("--requests-per-device", type=int, default=2, help="requests each device sends")
    n.add_argument("--steps", type=int, default=25, help="denoising steps N")
    n.add_argument("--fraction", type=float, default=0.3, help="relay at k = fraction x N")
    n.add_argument("--max-batch", type=int, default=8, help="host-step batch size of the batched runs")
    n.add_argument("--no-throughput", action="store_true", help="measure the hand-off overhead only")
    n.add_argument("--json", action="store_true", help="print the report as one JSON object")
    n.set_defaults(func=cmd_link)

    c = bench_sub.add_parser("cluster", help="Ray Serve cluster: requests/s and p50/p95 for 1, 2, 4 replicas; least-loaded vs round-robin "
                                             "with one replica slowed")
    c.add_argument("--family", help="family the replicas serve (default: the embedded family)")
    c.add_argument("--replicas", default="1,2,4", help="replica counts of the scaling phases, comma-separated (default 1,2,4)")
    c.add_argument("--slow-replicas", type=int, default=2, help="replicas of the routing comparison, one of them slowed (default 2)")
    c.add_argument("--slowdown", type=float, default=2.0, help="how much slower the slowed replica is (default 2)")
    c.add_argument("--devices", type=int, default=8, help="concurrent devices per phase (default 8)")
    c.add_argument("--requests-per-device", type=int, default=4, help="requests each device sends (default 4)")
    c.add_argument("--steps", type=int, default=25, help="denoising steps N (default 25)")
    c.add_argument("--fraction", type=float, default=1.0, help="host share of the steps (default 1: host-only, the nodes are measured)")
    c.add_argument("--max-batch", type=int, default=1, help="host-step batching per replica (default 1: off)")
    c.add_argument("--replica-cpus", type=float, default=0.5, help="Ray CPUs reserved per replica (default 0.5)")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_cluster)
    a = bench_sub.add_parser("attack", help="issue 19's abuse on a loopback host beside an honest device: its latency, "
                                            "host RSS, exactly one answer per request, the ledger's bound")
    a.add_argument("--family", help="family folder (default: the embedded family)")
    a.add_argument("--steps", type=int, default=8, help="denoising steps N of every request")
    a.add_argument("--accepted", type=int, default=1000, help="the attack lasts until the host accepted this many requests")
    a.add_argument("--links", type=int, default=20, help="work amplification: links per wave")
    a.add_argument("--requests-per-link", type=int, default=16, help="work amplification: requests per link")
    a.add_argument("--honest-requests", type=int, default=20, help="the honest device's requests unloaded (and at least as many under attack)")
    a.add_argument("--max-queue", type=int, default=64, help="the host's global queue cap")
    a.add_argument("--max-per-device", type=int, default=4, help="the host's per-link quota")
    a.add_argument("--max-per-client", type=int, default=None,
                   help="the host's quota per client over all its links (default: none beyond the queue cap and fair share)")
    a.add_argument("--attackers-share-token", action="store_true",
                   help="the attackers present the honest device's token (one client) instead of their own")
    a.add_argument("--ledger-max-entries", type=int, default=200, help="the ledger's bound on completed entries")
    a.add_argument("--quick", action="store_true", help="small counts (a smoke run; the other count options are ignored)")
    a.add_argument("--json", action="store_true", help="print the report as one JSON object")
    a.set_defaults(func=cmd_attack)
    o = bench_sub.add_parser("optimum", help="relaydiff's onnx device-only generation vs optimum's ORTStableDiffusionPipeline on "
                                             "the same weights (a bundle built with --layout optimum)")
    o.add_argument("--bundle", required=True, help="bundle folder built with `relaydiff bundle build --layout optimum`")
    o.add_argument("--repeats", type=int, default=3, help="timed images per pipeline, alternating; the median is reported")
    o.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's N)")
    o.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of both pipelines")
    o.add_argument("--json", action="store_true", help="print the report as one JSON object")
    o.set_defaults(func=cmd_optimum)


def cmd_device(args: argparse.Namespace) -> int:
    from relaydiff.export.bench import BenchConfig, bench_device, format_table

    config = BenchConfig(bundle=Path(args.bundle), repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                         family=Path(args.family) if args.family else None, relay=not args.no_relay,
                         memory=not args.no_memory,
                         components=tuple(c.strip() for c in args.components.split(",") if c.strip()) if args.components is not None else None)
    report = bench_device(config, log=None if args.json else (lambda m: log.info("timing %s", m)))
    result(json.dumps(report, sort_keys=True) if args.json else format_table(report))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from relaydiff.export.bench_cache import CacheBenchConfig, bench_cache, format_table

    config = CacheBenchConfig(bundle=Path(args.bundle), repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                              budget_fraction=args.budget_fraction, relay=not args.no_relay, relay_repeats=args.relay_repeats)
    report = bench_cache(config)
    result(json.dumps(report, sort_keys=True) if args.json else format_table(report))
    return 0


def cmd_optimum(args: argparse.Namespace) -> int:
    from relaydiff.export.bench_optimum import OptimumBenchConfig, bench_optimum, format_report

    config = OptimumBenchConfig(bundle=Path(args.bundle), repeats=args.repeats, steps=args.steps, threads=args.threads)
    report = bench_optimum(config)
    result(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    from relaydiff.host.bench import LinkBenchConfig, bench_link, format_report

    config = LinkBenchConfig(rounds=args.rounds, family=Path(args.family) if args.family else None, devices=args.devices,
                             requests_per_device=args.requests_per_device, steps=args.steps, fraction=args.fraction,
                             max_batch=args.max_batch, throughput=not args.no_throughput)
    report = bench_link(config, log=None if args.json else (lambda m: log.info("running %s", m)))
    result(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from relaydiff.core.errors import RelaydiffError
    from relaydiff.host.cluster_bench import ClusterBenchConfig, bench_cluster, format_report

    try:
        counts = tuple(int(x) for x in args.replicas.split(","))
    except ValueError:
        raise RelaydiffError(f"--replicas must be comma-separated positive integers, got {args.replicas!r}") from None
    config = ClusterBenchConfig(family=Path(args.family) if args.family else None, replica_counts=counts,
                                slow_replicas=args.slow_replicas, slowdown=args.slowdown, devices=args.devices,
                                requests_per_device=args.requests_per_device, steps=args.steps, fraction=args.fraction,
                                max_batch=args.max_batch, replica_num_cpus=args.replica_cpus)
    report = bench_cluster(config, log=None if args.json else (lambda m: log.info("running %s", m)))
    result(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0
def cmd_attack(args: argparse.Namespace) -> int:
    from relaydiff.host.attack import AttackBenchConfig, bench_attack, format_report

    family = Path(args.family) if args.family else None
    if args.quick:
        config = AttackBenchConfig.quick(family, attackers_share_token=args.attackers_share_token)
    else:
        config = AttackBenchConfig(family=family, steps=args.steps, accepted=args.accepted, links=args.links,
                                   requests_per_link=args.requests_per_link, honest_requests=args.honest_requests,
                                   max_queue=args.max_queue, max_per_device=args.max_per_device,
                                   max_per_client=args.max_per_client, ledger_max_entries=args.ledger_max_entries,
                                   attackers_share_token=args.attackers_share_token)
    report = bench_attack(config, log=None if args.json else (lambda m: log.info("attack bench: %s", m)))
    result(json.dumps(report, sort_keys=True) if args.json else format_report(report))
    return 0 if report["ok"] else 1
