"""``relaydiff bench cluster``: the Ray Serve cluster's requests/s and latency by replica count and by routing.

One local Ray instance, one Serve application updated in place between phases (same code version: the replica
count only grows, the replicas already running stay and keep their ranks):

1. least-loaded routing with 1, 2, 4 ... replicas (``replica_counts``, in ascending order);
2. right after the phase with ``slow_replicas`` replicas (on those same replicas): one of them (rank 0) slowed
   ``slowdown`` x (its worker thread is held that much longer per run, without using CPU), least-loaded, then
   round-robin (strict: request i goes to replica i mod N), in the same run.

Each phase: a fresh link ingress (:class:`~relaydiff.host.cluster.ClusterHost`), one warm-up request per replica,
then ``devices`` concurrent in-process devices each sending ``requests_per_device`` requests. Throughput =
requests / wall seconds from the first request to the last answer; latency = each request's device-side
latency (p50, p95). Every request is checked to be answered exactly once in the ingress's ledger. With the
default ``fraction`` = 1 the replicas run every step (host-only) and the devices only decode, so the figures
measure the host nodes; relaying (fraction < 1) adds the devices' steps, which here share this machine's CPUs.
Replicas on one machine share its cores: more replicas cannot beat the core count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from relaydiff.core.errors import RelaydiffError

TOKEN = "bench-cluster-token-0123456789"


@dataclass(frozen=True)
class ClusterBenchConfig:
    """What ``relaydiff bench cluster`` measures."""

    family: Path | None = None  # None: the embedded default family
    replica_counts: tuple[int, ...] = (1, 2, 4)
    slow_replicas: int = 2  # replicas of the routing comparison
    slowdown: float = 2.0  # how much slower the slowed replica is
    devices: int = 8  # concurrent device links per phase
    requests_per_device: int = 4  # requests each device sends, one after the other
    steps: int = 25  # N
    fraction: float = 1.0  # host share of the steps (1: host-only)
    max_batch: int = 1  # host-step batching per replica (1: off, so that service time is per request)
    replica_num_cpus: float = 0.5  # Ray CPUs reserved per replica (logical)
    ray_cpus: int | None = None  # logical CPUs of the local Ray instance (default: enough for the largest phase)
    deadline_s: float = 600.0  # each device's deadline per request

    def __post_init__(self) -> None:
        for name in ("slow_replicas", "devices", "requests_per_device", "steps", "max_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RelaydiffError(f"{name} must be a positive integer, got {v!r}")
        if not self.replica_counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.replica_counts):
            raise RelaydiffError(f"replica_counts must be positive integers, got {self.replica_counts!r}")
        if self.slow_replicas < 2:
            raise RelaydiffError(f"slow_replicas must be at least 2 (one slowed, one not), got {self.slow_replicas}")
        if not (math.isfinite(self.slowdown) and self.slowdown >= 1.0):
            raise RelaydiffError(f"slowdown must be a number >= 1, got {self.slowdown!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise RelaydiffError(f"fraction must be in [0, 1], got {self.fraction!r}")
        if not (math.isfinite(self.replica_num_cpus) and self.replica_num_cpus > 0):
            raise RelaydiffError(f"replica_num_cpus must be > 0, got {self.replica_num_cpus!r}")
        if self.family is not None and not Path(self.family).is_dir():
            raise RelaydiffError(f"family folder {str(self.family)!r} does not exist")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _phase(handle: Any, cluster: Any, runtime: Any, config: ClusterBenchConfig, replicas: int) -> dict[str, Any]:
    from relaydiff.host.cluster import ClusterHost
    from relaydiff.host.controller import HostConfig
    from relaydiff.host.policy import FixedPolicy
    from relaydiff.link.config import LinkConfig
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.settings import GenerationSettings

    settings = GenerationSettings(steps=config.steps)
    total = config.devices * config.requests_per_device
    host_config = HostConfig(settings=settings, max_queue=max(64, total), max_requests_per_session=4,
                             result_timeout_s=config.deadline_s, link=LinkConfig(recv_timeout_s=config.deadline_s))
    host = ClusterHost(handle, cluster, auth_token=TOKEN, policy=FixedPolicy(config.fraction), config=host_config)
    async with host:
        def client() -> DeviceClient:
            return DeviceClient(runtime, host.url, auth_token=TOKEN, settings=settings, deadline_s=config.deadline_s,
                                link_config=LinkConfig(recv_timeout_s=config.deadline_s))

        await asyncio.gather(*[client().generate(f"warm-up {i}") for i in range(replicas)])  # every replica ran once
        warm = len(host.ledger.entries())
        calls_before = dict(host.cluster_stats.calls)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[client().generate_many([f"request {d}.{r}" for r in range(config.requests_per_device)])
                                      for d in range(config.devices)])
        wall = time.perf_counter() - t0
        loads = host.node_loads()
    outcomes = [o for device in outs for o in device]
    entries = host.ledger.entries()[warm:]
    if len(entries) != total or any(e.source is None for e in entries):
        raise RelaydiffError(f"{len(entries)} ledger entries (pending: {sum(e.source is None for e in entries)}) for {total} requests")
    latencies = [o.latency_s for o in outcomes]
    calls = {k: v - calls_before.get(k, 0) for k, v in host.cluster_stats.calls.items()}
    slowed = {rid: v.get("slowdown", 1.0) for rid, v in loads.items()}
    return {
        "replicas": replicas, "routing": cluster.routing, "requests": total, "wall_s": round(wall, 3),
        "requests_per_s": round(total / wall, 4), "p50_s": round(_percentile(latencies, 0.5), 4),
        "p95_s": round(_percentile(latencies, 0.95), 4), "mean_s": round(statistics.fmean(latencies), 4),
        "modes": {m: sum(o.mode == m for o in outcomes) for m in sorted({o.mode for o in outcomes})},
        "calls_by_replica": {rid: {"calls": n, "slowdown": slowed.get(rid, 1.0)} for rid, n in sorted(calls.items())},
        "replica_lost": host.cluster_stats.replica_lost,
        "slowed_seen": sum(float(v.get("slowdown", 1.0)) != 1.0 for v in loads.values()),
    }


def bench_cluster(config: ClusterBenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every phase in one Ray instance; returns the report (phases, ratios, timings of Ray itself)."""
    from relaydiff.core import family
    from relaydiff.host.cluster import ClusterConfig, ReplicaSpec, deploy, ray_init
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.device import DeviceRuntime
    from relaydiff.runtime.settings import GenerationSettings

    say = log or (lambda _m: None)
    most = max(*config.replica_counts, config.slow_replicas)
    cpus = config.ray_cpus or max(2, math.ceil(most * config.replica_num_cpus))
    root = config.family if config.family is not None else family.default_family_dir()
    runtime = DeviceRuntime(create_backend("torch", model=family.load(family.resolve(root, role="device"))))
    spec = ReplicaSpec(family_dir=str(root), settings=GenerationSettings(steps=config.steps).to_dict(), max_batch=config.max_batch)
    t0 = time.perf_counter()
    ray_init(None, cpus)
    ray_s = time.perf_counter() - t0
    phases: list[dict[str, Any]] = []
    deploy_s: list[float] = []
    try:
        for replicas, routing, slow in _plan(config):
            cluster = ClusterConfig(min_replicas=replicas, max_replicas=replicas, routing=routing,
                                    replica_num_cpus=config.replica_num_cpus, max_batch=config.max_batch, stats_period_s=0.25)
            t = time.perf_counter()
            slow_arg = (0, config.slowdown) if slow else None  # Serve ranks replicas 0..N-1: slow rank 0
            handle = deploy(cluster, spec, slow=slow_arg)
            deploy_s.append(round(time.perf_counter() - t, 2))
            say(f"{replicas} replica(s), {routing}" + (f", rank {slow_arg[0]} slowed {config.slowdown:g}x" if slow_arg else ""))
            phase = asyncio.run(_phase(handle, cluster, runtime, config, replicas))
            phase["slowed"] = slow_arg is not None
            seen = phase.pop("slowed_seen")
            if seen != (1 if phase["slowed"] else 0):
                raise RelaydiffError(f"{seen} replicas reported a slowdown, expected {1 if phase['slowed'] else 0}")
            phases.append(phase)
    finally:
        _shutdown()
    return {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
            "ray_init_s": round(ray_s, 2), "deploy_s": deploy_s, "phases": phases, "ratios": _ratios(phases),
            "cpu_count": _cpus()}


def _plan(config: ClusterBenchConfig) -> list[tuple[int, str, bool]]:
    """(replicas, routing, slowed) of each phase, in order: replica counts ascending, the slowed pair right after the
    phase with their replica count (or where it fits), so that the application only ever scales up in place
    (same code version: the replicas already running stay, with their ranks) and the slowed phases reuse them."""
    plan: list[tuple[int, str, bool]] = []
    slowed = [(config.slow_replicas, "least_loaded", True), (config.slow_replicas, "round_robin", True)]
    for n in sorted(set(config.replica_counts) | {config.slow_replicas}):
        if n in config.replica_counts:
            plan.append((n, "least_loaded", False))
        if n == config.slow_replicas:
            plan += slowed
    return plan


def _ratios(phases: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    unslowed = {p["replicas"]: p for p in phases if not p["slowed"]}
    if 1 in unslowed:
        for n, p in unslowed.items():
            if n != 1:
                out[f"requests_per_s_{n}_vs_1_replicas"] = round(p["requests_per_s"] / unslowed[1]["requests_per_s"], 3)
    slow = {p["routing"]: p for p in phases if p["slowed"]}
    if {"least_loaded", "round_robin"} <= set(slow):
        ll, rr = slow["least_loaded"], slow["round_robin"]
        out["slowed_requests_per_s_least_loaded_vs_round_robin"] = round(ll["requests_per_s"] / rr["requests_per_s"], 3)
        out["slowed_p95_round_robin_vs_least_loaded"] = round(rr["p95_s"] / ll["p95_s"], 3)
    return out


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Ray start {report['ray_init_s']:.1f} s; deploys {report['deploy_s']} s; {report['cpu_count']} CPUs",
             f"{'replicas':>8} {'routing':>12} {'slowed':>6} {'req/s':>8} {'p50 s':>8} {'p95 s':>8}  calls by replica (slowdown)"]
    for p in report["phases"]:
        calls = ", ".join(f"{v['calls']}" + (f" ({v['slowdown']:g}x)" if v["slowdown"] != 1.0 else "") for v in p["calls_by_replica"].values())
        lines.append(f"{p['replicas']:>8} {p['routing']:>12} {'yes' if p['slowed'] else 'no':>6} {p['requests_per_s']:>8.3f} "
                     f"{p['p50_s']:>8.3f} {p['p95_s']:>8.3f}  {calls}")
    for k, v in report["ratios"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)
