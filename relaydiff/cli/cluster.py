"""``relaydiff cluster up``: many edge nodes on Ray Serve behind one link endpoint (``relaydiff.host.cluster``).

The single-process ``relaydiff host`` stays the default for one machine; this command starts (or joins, with
``ray_address: auto`` in the config) a Ray instance, deploys the host replicas and serves the link ingress
until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import time
from typing import Any

from relaydiff.cli.output import message, result
from relaydiff.core.errors import RelaydiffError


def register(sub: Any) -> None:
    """Add ``cluster`` with its sub-command ``up`` to the ``relaydiff`` subparsers."""
    from relaydiff.cli.service import LOG_LEVELS, POLICIES, _add_settings_args

    p = sub.add_parser("cluster", help="many host replicas on Ray Serve behind one link endpoint")
    cluster_sub = p.add_subparsers(dest="cluster_command", required=True)
    u = cluster_sub.add_parser("up", help="start Ray (local, or join with ray_address in --config), deploy N host replicas, serve the link")
    u.add_argument("--replicas", type=int, help="replicas to start with (default: the config's min_replicas, else 1)")
    u.add_argument("--config", help="cluster config, .json or .yaml: replica bounds, routing, CPUs per replica (docs/cluster.md)")
    u.add_argument("--routing", choices=("least_loaded", "round_robin"), help="override the config's routing")
    u.add_argument("--address", help="Ray cluster to join, e.g. auto (a `ray start --head` on this machine) or HOST:PORT; "
                   "overrides the config's ray_address (default: start a local Ray instance)")
    u.add_argument("--family", help="family folder with host and device variants (default: the embedded family)")
    u.add_argument("--host-variant", help="family variant to use as host (default: the family's default_host)")
    u.add_argument("--device-variant", help="variant the replicas finish with when a device does not (default_device)")
    u.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT of the link ingress (default 127.0.0.1:8765; port 0 = any free)")
    u.add_argument("--token-file", help="file holding the link token devices must present (default $RELAYDIFF_TOKEN, else a random one, printed once)")
    u.add_argument("--token", help="the link token itself (visible in the process list: prefer --token-file)")
    u.add_argument("--tls-cert", help="PEM certificate (chain) to serve wss:// (with --tls-key)")
    u.add_argument("--tls-key", help="PEM private key of --tls-cert")
    u.add_argument("--max-queue", type=int, default=64, help="requests in progress over all devices before busy (default 64)")
    u.add_argument("--max-per-device", type=int, default=4, help="requests in progress on one link before busy (default 4)")
    u.add_argument("--policy", choices=POLICIES, help="split policy, as for `relaydiff host` (the bandit sees node loads)")
    u.add_argument("--fraction", type=float, help="share of the steps the host runs, for --policy fixed")
    u.add_argument("--bandit-state", help="JSON Lines file the bandit loads (if it exists) and keeps its state in")
    u.add_argument("--result-timeout", type=float, default=120.0, help="longest wait for a device's result after a hand-off, s")
    u.add_argument("--ray-cpus", type=int, help="logical CPUs of a local Ray instance (default: replicas x replica_num_cpus, at least 2)")
    u.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log level on stderr (default info)")
    u.add_argument("--duration", type=float, help="stop after this many seconds (default: run until interrupted)")
    u.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    _add_settings_args(u)
    u.set_defaults(func=cmd_up)


def cluster_config(args: argparse.Namespace) -> Any:
    """The ClusterConfig of --config, --replicas and --routing (validated; bad values name themselves)."""
    from relaydiff.host.cluster import ClusterConfig

    overrides: dict[str, Any] = {"routing": args.routing} if args.routing else {}
    if args.address is not None:
        if not args.address.strip():
            raise RelaydiffError(f"--address must name a Ray cluster (auto or HOST:PORT), got {args.address!r}")
        overrides["ray_address"] = args.address
    config = ClusterConfig.from_file(args.config, **overrides) if args.config else ClusterConfig(**overrides)
    return config.with_replicas(args.replicas)


def replica_spec(args: argparse.Namespace, cluster: Any) -> tuple[Any, Any]:
    """(GenerationSettings, ReplicaSpec) of the flags: what every replica loads and runs. The same flags give the
    same spec, hence the same code version: ``cluster up`` again on a running application reuses its replicas."""
    from relaydiff.cli.service import HOST_NEEDS, _settings
    from relaydiff.core import family
    from relaydiff.host.cluster import ReplicaSpec

    root = family.require_family(args.family, needed=HOST_NEEDS) if args.family else family.default_family_dir()
    settings = _settings(args, family.default_sampler(family.resolve(root, args.host_variant, role="host")))
    spec = ReplicaSpec(family_dir=str(root), host_variant=args.host_variant, device_variant=args.device_variant,
                       settings=settings.to_dict(), workers=cluster.replica_workers, max_batch=cluster.max_batch,
                       torch_threads=cluster.replica_torch_threads)
    return settings, spec


def cmd_up(args: argparse.Namespace) -> int:
    import dataclasses
    import math

    from relaydiff.cli.service import _logging, _policy, _server_tls, _token, parse_listen
    from relaydiff.host.cluster import ClusterHost, app_exists, deploy, ray_init
    from relaydiff.host.controller import HostConfig
    from relaydiff.link.config import LinkConfig

    cluster = cluster_config(args)
    listen_host, port = parse_listen(args.listen)
    token = _token(args, required=False)
    generated = token is None
    token = token or secrets.token_urlsafe(18)
    if args.duration is not None and not args.duration > 0:
        raise RelaydiffError(f"--duration must be > 0 seconds, got {args.duration!r}")
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise RelaydiffError(f"--ray-cpus must be a positive integer, got {args.ray_cpus!r}")
    settings, spec = replica_spec(args, cluster)
    config = HostConfig(settings=settings, listen_host=listen_host, port=port, result_timeout_s=args.result_timeout,
                        max_queue=args.max_queue, max_requests_per_session=args.max_per_device, link=LinkConfig())
    tls = _server_tls(args)
    policy = _policy(args)
    replicas = cluster.initial_replicas(args.replicas)
    cpus = args.ray_cpus or max(2, math.ceil(cluster.max_replicas * cluster.replica_num_cpus))
    with _logging(args):
        t_ray = time.monotonic()
        message(f"starting Ray ({cluster.ray_address or f'local, {cpus} CPUs'}) and {replicas} replica(s)...")
        started = ray_init(cluster.ray_address, cpus)
        keep = not started and app_exists(cluster)  # someone else's application: updated in place, left running at exit
        try:
            handle = deploy(cluster, spec, replicas=replicas)
        except BaseException:
            _stop(cluster, started, keep)
            raise
        startup_s = time.monotonic() - t_ray
        server = ClusterHost(handle, cluster, auth_token=token, policy=policy, config=config, ssl=tls)

        async def run() -> float:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (RuntimeError, ValueError, NotImplementedError):
                    pass
            t0 = time.monotonic()
            async with server:
                message(f"relaydiff cluster ({replicas} replicas, {cluster.routing}) listening on {server.url}"
                        + (f" (token {token})" if generated else ""))
                try:
                    await asyncio.wait_for(stop.wait(), args.duration)
                except TimeoutError:
                    pass
            return time.monotonic() - t0

        try:
            seconds = asyncio.run(run())
        finally:
            _stop(cluster, started, keep)
    entries = server.ledger.entries()
    by_source: dict[str, int] = {}
    for e in entries:
        name = e.source.value if e.source is not None else "pending"
        by_source[name] = by_source.get(name, 0) + 1
    payload = {"requests": len(entries), "by_source": by_source, "seconds": round(seconds, 2), "startup_s": round(startup_s, 2),
               "replicas": replicas, "cluster": dataclasses.asdict(cluster), "stats": dataclasses.asdict(server.stats),
               "cluster_stats": server.cluster_stats.to_dict(), "policy": type(policy).__name__}
    lines = [f"served {len(entries)} requests in {seconds:.1f} s on {replicas} replica(s): "
             + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items()))]
    result(json.dumps(payload) if args.json else "\n".join(lines))
    return 0


def _stop(cluster: Any, started: bool, keep: bool) -> None:
    """Stop Serve and the local Ray instance this command started; in a Ray cluster it joined (or one this process
    was already connected to), delete its application if it created it (``keep``: the application was there
    before, e.g. another ingress's) and leave the rest running."""
    import ray
    from ray import serve

    from relaydiff.host.cluster import undeploy

    if not started:
        if not keep:
            undeploy(cluster)
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
