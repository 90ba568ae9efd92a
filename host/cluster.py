"""Many edge nodes behind one endpoint, on Ray Serve: host replicas as a Serve deployment, one link ingress.

- :class:`HostReplica` is the Serve deployment: each replica loads the family and runs the host half
  through the single-process host's own code (a :class:`~relaydiff.host.controller.HostServer` that does
  not listen: its batching queue, :func:`relaydiff.core.relay.start`, the fallback's
  :func:`~relaydiff.core.relay.resume`, cancellation between steps). It reports its
  :class:`~relaydiff.host.controller.NodeLoad` (queue length, busy fraction, batch fill, seconds per
  request) to Serve through ``record_routing_stats``.
- :class:`LoadAwareRouter` is the deployment's Serve request router (Serve's extension point for
  replica-reported stats): ``least_loaded`` sends a request to the replica with the least expected wait,
  (requests it has + 1) x its seconds per request; ``round_robin`` takes the replicas in turn (for comparison).
- :class:`ClusterHost` is the ingress devices connect to: a :class:`HostServer` (same handshake, tokens,
  caps, admission, ledger and exactly-once accounting) whose host steps and fallbacks go to the replicas.
  A replica that dies mid-request is retried on another one (``attempts`` in all, within the request's
  deadline); when none is left the device gets ``Error(request_failed)`` and generates alone. A contextual
  policy (the bandit) sees the node load of the replica the router would pick as its host queue and utilisation.

Between the ingress and the replicas only plain values travel (dicts of str/float/int and the relay state's
safetensors bytes, re-validated by :meth:`RelayState.from_bytes`); Ray's own pickling stays inside the cluster,
never on the device link. Ray is imported lazily: the rest of relaydiff runs without it (the ``cluster`` extra).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext
from typing import Any, cast

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.state import RelayState
from relaydiff.host.controller import HostConfig, HostServer, NodeLoad, _Cancelled, _Job
from relaydiff.host.policy import Conditions, Policy
from relaydiff.runtime.settings import GenerationSettings

log = logging.getLogger(__name__)

ROUTINGS = ("least_loaded", "round_robin")
DEPLOYMENT = "relaydiff_host"
RETRY_BACKOFF_S = 0.2  # wait before asking another replica after one was lost
POLL_S = 0.05  # how often the ingress checks a request's cancellation while a replica works on it

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "min_replicas": {"type": "integer", "minimum": 1, "maximum": 1024},
        "max_replicas": {"type": "integer", "minimum": 1, "maximum": 1024},
        "target_ongoing_requests": {"type": "number", "exclusiveMinimum": 0, "maximum": 1024},
        "max_ongoing_requests": {"type": "integer", "minimum": 1, "maximum": 4096},
        "replica_num_cpus": {"type": "number", "minimum": 0, "maximum": 1024},
        "replica_torch_threads": {"type": "integer", "minimum": 1, "maximum": 256},
        "replica_workers": {"type": "integer", "minimum": 1, "maximum": 64},
        "max_batch": {"type": "integer", "minimum": 1, "maximum": 256},
        "routing": {"enum": list(ROUTINGS)},
        "stats_period_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "attempts": {"type": "integer", "minimum": 1, "maximum": 16},
        "ray_address": {"type": ["string", "null"], "maxLength": 1024},
        "app_name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
    },
}


@dataclass(frozen=True)
class ClusterConfig:
    """How the cluster runs: replica bounds (Serve autoscaling), what each replica gets, how requests are routed."""

    min_replicas: int = 1  # autoscaling lower bound
    max_replicas: int = 1  # autoscaling upper bound (= min_replicas: a fixed number of replicas)
    target_ongoing_requests: float = 2.0  # Serve autoscales to keep about this many requests per replica
    max_ongoing_requests: int = 16  # requests one replica takes at once (Serve queues the rest at the router)
    replica_num_cpus: float = 1.0  # CPUs Ray reserves per replica
    replica_torch_threads: int = 1  # torch intra-op threads in each replica
    replica_workers: int = 1  # worker threads per replica (HostConfig.workers)
    max_batch: int = 8  # host-step batching per replica (HostConfig.max_batch)
    routing: str = "least_loaded"  # or "round_robin"
    stats_period_s: float = 0.5  # how often Serve collects each replica's NodeLoad
    attempts: int = 3  # replicas tried per request when one is lost
    ray_address: str | None = None  # None: start a local Ray instance; "auto": join the running cluster
    app_name: str = "relaydiff"  # the Serve application's name

    def __post_init__(self) -> None:
        check_config(dataclasses.asdict(self), "ClusterConfig")
        if self.min_replicas > self.max_replicas:
            raise RelaydiffError(f"ClusterConfig: min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "ClusterConfig":
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config; unknown keys and bad values are refused.

        Raises:
            RelaydiffError: unreadable file, not a mapping, or a value out of range (the message names it).
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RelaydiffError(f"cluster config {str(p)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                obj = yaml.safe_load(text)
            elif p.suffix.lower() == ".json":
                obj = json.loads(text)
            else:
                raise RelaydiffError(f"cluster config {str(p)!r}: expected a .json, .yaml or .yml file")
        except (ValueError, ImportError) as exc:
            raise RelaydiffError(f"cluster config {str(p)!r} does not parse: {exc}") from None
        except Exception as exc:  # yaml.YAMLError (yaml is imported lazily, so it cannot be named above)
            if type(exc).__module__.startswith("yaml"):
                raise RelaydiffError(f"cluster config {str(p)!r} does not parse: {exc}") from None
            raise
        if obj is None:
            obj = {}
        check_config(obj, f"cluster config {str(p)!r}")
        return cls(**{**obj, **overrides})

    def with_replicas(self, replicas: int | None) -> "ClusterConfig":
        """The config with ``replicas`` to start with: fixed (min = max = N) unless the config has bounds around N."""
        if replicas is None:
            return self
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise RelaydiffError(f"--replicas must be a positive integer, got {replicas!r}")
        if self.min_replicas == self.max_replicas:
            return dataclasses.replace(self, min_replicas=replicas, max_replicas=replicas)
        if not self.min_replicas <= replicas <= self.max_replicas:
            raise RelaydiffError(f"--replicas {replicas} is outside the config's bounds [{self.min_replicas}, {self.max_replicas}]")
        return self

    def initial_replicas(self, replicas: int | None) -> int:
        return replicas if replicas is not None else self.min_replicas


def check_config(obj: Any, where: str) -> None:
    """Validate a config mapping against CONFIG_SCHEMA, naming the first bad key and value."""
    import jsonschema

    if not isinstance(obj, dict):
        raise RelaydiffError(f"{where} must be a mapping of settings, got {type(obj).__name__}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(CONFIG_SCHEMA).iter_errors(obj))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise RelaydiffError(f"{where}: {key}: {error.message}")
    for key, value in obj.items():  # JSON Schema lets 1.0 pass as an integer; Python bools pass as numbers
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise RelaydiffError(f"{where}: {key}: {value!r} is not a valid value")


# -- the replica (a Serve deployment) -----------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads and how it runs (plain values: Serve ships this to every replica)."""

    family_dir: str | None = None
    host_variant: str | None = None
    device_variant: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # GenerationSettings fields
    workers: int = 1
    max_batch: int = 8
    torch_threads: int = 1


class _ReplicaHost(HostServer):
    """The single-process host's step engine inside a replica; ``slowdown`` > 1 stretches each run (benchmarks)."""

    slowdown = 1.0

    async def _work(self, fn: Any, *args: Any) -> Any:
        if self.slowdown <= 1.0:
            return await super()._work(fn, *args)
        factor = self.slowdown

        def slowed(*a: Any) -> Any:  # holds the worker thread (factor - 1) times as long again, without using CPU
            t0 = time.perf_counter()
            out = fn(*a)
            time.sleep((factor - 1.0) * (time.perf_counter() - t0))
            return out

        return await super()._work(slowed, *args)


class HostReplica:
    """One edge node: the host half of each relay (host steps, fallbacks) and its reported load."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import torch

        torch.set_num_threads(spec.torch_threads)
        settings = GenerationSettings(**spec.settings)
        config = HostConfig(settings=settings, workers=spec.workers, max_batch=spec.max_batch)
        self.server: _ReplicaHost = cast(_ReplicaHost, _ReplicaHost.from_family(spec.family_dir, auth_token="replica-does-not-listen", host_variant=spec.host_variant,
                                               device_variant=spec.device_variant, config=config))
        self.server.start_workers()
        self.rank, self.name = _replica_identity()
        self.served = 0
        log.info("replica %s (rank %s) ready, slowdown %.2g", self.name, self.rank, self.server.slowdown)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: ``{"slow_rank": r, "slowdown": f}`` stretches the host runs of the replica of rank r
        f times (benchmarks: one deliberately slowed node); ``{}`` runs every replica at full speed."""
        slow_rank, factor = config.get("slow_rank"), float(config.get("slowdown", 1.0))
        slowdown = factor if slow_rank is not None and int(slow_rank) == self.rank else 1.0
        if slowdown != self.server.slowdown:  # its past run times no longer say what a run costs
            self.server._run_seconds.clear()
        self.server.slowdown = slowdown

    async def host_run(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Host steps [0, k) of one request: ``{"request_id", "prompt", "relay_step", "deadline_s"}``."""
        request = self.server.config.settings.request(str(payload["prompt"]), int(payload["relay_step"]))
        job = _Job(str(payload["request_id"]), time.monotonic() + float(payload["deadline_s"]))
        try:
            state, seconds, batch = await self.server._host_run(request, job)
        except asyncio.CancelledError:  # the ingress cancelled the call (the device left or aborted)
            job.cancel("the ingress cancelled it")
            self.server._drop_cancelled()
            raise
        except _Cancelled as stop:
            return {"cancelled": str(stop), "deadline": stop.deadline, "replica": self.name}
        self.served += 1
        return {"state": state.to_bytes(), "host_s": seconds, "batch": batch, "replica": self.name,
                "load": self.server.node_load().to_dict()}

    async def fallback(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Steps [k, N) of a relay state the device could not use: ``{"request_id", "state", "deadline_s"}``."""
        from safetensors.torch import save

        state = RelayState.from_bytes(bytes(payload["state"]))
        job = _Job(str(payload["request_id"]), time.monotonic() + float(payload["deadline_s"]))
        task = asyncio.ensure_future(self.server._fallback_run(state, job))
        try:
            latents, seconds = await asyncio.shield(task)
        except asyncio.CancelledError:
            job.cancel("the ingress cancelled it")  # the run stops at its next step
            raise
        except _Cancelled as stop:
            return {"cancelled": str(stop), "deadline": stop.deadline, "replica": self.name}
        return {"latents": save({"latents": latents.contiguous()}), "seconds": seconds, "replica": self.name}

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this every ``stats_period_s``; the router reads it as the replica's routing stats."""
        return {**self.server.node_load().to_dict(), "pid": os.getpid(), "replica": self.name, "rank": self.rank,
                "slowdown": self.server.slowdown, "served": self.served}

    def pid(self) -> int:
        return os.getpid()


def _replica_identity() -> tuple[int, str]:
    """(rank, unique id) of the replica this runs in."""
    from ray import serve

    ctx = serve.get_replica_context()
    rank = getattr(ctx.rank, "rank", ctx.rank)
    return int(rank) if isinstance(rank, int) else -1, str(ctx.replica_id.unique_id)


# -- node loads the ingress sees ---------------------------------------------------------------------

# app name -> replica id -> the replica's last reported load plus the router's own count of requests it holds.
# Written by LoadAwareRouter (which Serve runs inside the ingress process, on its router thread), read by ClusterHost.
NODE_LOADS: dict[str, dict[str, dict[str, Any]]] = {}


def expected_wait(load: dict[str, Any], default_service_s: float) -> float:
    """A replica's least-loaded score: (requests it holds + 1) x its seconds per request."""
    held = max(float(load.get("ongoing", 0)), float(load.get("queue", 0)))
    service = float(load.get("service_s") or 0.0) or default_service_s
    return (held + 1.0) * service + 1e-3 * float(load.get("busy_fraction", 0.0))


def default_service(loads: list[dict[str, Any]]) -> float:
    known = [float(v["service_s"]) for v in loads if v.get("service_s")]
    return sum(known) / len(known) if known else 1.0


def least_loaded(loads: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not loads:
        return None
    default = default_service(list(loads.values()))
    return min(loads.values(), key=lambda v: expected_wait(v, default))


class RouteTable:
    """The routing decisions of one Serve router, kept apart from Ray so that they can be tested alone.

    Serve asks its router for a replica (``choose_replicas``) for several pending requests at once (up to two
    routing tasks per replica), and only tells it where a request went (``on_request_routed``) after the
    replica's accept round trip. A router that counted requests or advanced its turn there decided every request
    of a burst on the same stale state: all of them went to the same replica (measured: "round robin" sent 23
    and 9 of 32 requests; least-loaded sent a whole burst to the faster replica and its p95 doubled). This table
    decides at choice time instead: each request is assigned once, when first asked about, and counted on its
    replica from then until it completes (or is cancelled before being sent); later questions about the same
    request get the same answer (round robin: strictly; least loaded: first, then the others by expected wait).

    Keys are Serve's internal request ids; replica ids are strings. Not thread-safe: Serve calls a router from
    its own event loop only.
    """

    def __init__(self) -> None:
        self.turn = 0  # next round-robin position
        self.held: Counter[str] = Counter()  # replica id -> requests assigned to it and not yet completed
        self.assigned: dict[str, str] = {}  # request key -> replica id it is counted on
        self.sent: Counter[str] = Counter()  # replica id -> requests it accepted (Serve reported them routed), not yet done
        self._sent_to: dict[str, str] = {}  # request key -> replica that accepted it
        self._waiting: dict[str, Any] = {}  # key -> a "cancelled()" callable, for assignments not yet sent

    def loads(self, replicas: list[str], stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each replica's last report with ``ongoing`` = requests this router has assigned it and not seen end, and
        ``sent`` = those of them the replica has accepted."""
        return {rid: {**(stats.get(rid) or {}), "ongoing": self.held[rid], "sent": self.sent[rid]} for rid in replicas}

    def choose(self, key: str | None, replicas: list[str], stats: dict[str, dict[str, Any]], routing: str,
               cancelled: Any = None) -> list[str]:
        """The replicas to try for request ``key``, best first (``replicas`` in a stable order)."""
        self._forget_cancelled()
        if not replicas:
            return []
        previous = self.assigned.get(key) if key is not None else None
        if previous is not None and previous in replicas:
            if routing == "round_robin":
                return [previous]  # strict: the request waits for its turn's replica
            self._release(key)  # least loaded: asked again (the choice was full or did not answer): choose afresh
        elif previous is not None:
            self._release(key)  # its replica is gone
        if routing == "round_robin":
            target = replicas[self.turn % len(replicas)]
            self.turn += 1
            order = [target]
        else:
            loads = self.loads(replicas, stats)
            default = default_service(list(loads.values()))
            order = sorted(replicas, key=lambda rid: expected_wait(loads[rid], default))
            target = order[0]
        if key is not None:
            self.assigned[key] = target
            self.held[target] += 1
            if cancelled is not None:
                self._waiting[key] = cancelled
        return order

    def routed(self, key: str, replica: str) -> None:
        """Serve sent request ``key`` to ``replica`` (and it accepted): move its count there if it went elsewhere."""
        self._waiting.pop(key, None)
        if key not in self._sent_to:
            self._sent_to[key] = replica
            self.sent[replica] += 1
        if self.assigned.get(key) != replica:
            self._release(key)
            self.assigned[key] = replica
            self.held[replica] += 1

    def completed(self, key: str, replica: str) -> None:
        """Request ``key`` ended on ``replica`` (or was refused by it): no longer counted."""
        if self.assigned.get(key) == replica:
            self._release(key)
        if self._sent_to.get(key) == replica:
            del self._sent_to[key]
            if self.sent[replica] > 0:
                self.sent[replica] -= 1

    def replica_gone(self, replica: str) -> None:
        for key in [k for k, r in self.assigned.items() if r == replica]:
            self._release(key)
        for key in [k for k, r in self._sent_to.items() if r == replica]:
            del self._sent_to[key]
        self.held.pop(replica, None)
        self.sent.pop(replica, None)

    def _release(self, key: str | None) -> None:
        if key is None:
            return
        replica = self.assigned.pop(key, None)
        self._waiting.pop(key, None)
        if replica is not None and self.held[replica] > 0:
            self.held[replica] -= 1

    def _forget_cancelled(self) -> None:
        """Drop assignments whose request was cancelled before Serve sent it (no completion will come for them)."""
        for key, cancelled in list(self._waiting.items()):
            if cancelled():
                self._release(key)


# -- the ingress -----------------------------------------------------------------------------------


@dataclass
class ClusterStats:
    """What the ingress did with the replicas."""

    calls: Counter[str] = field(default_factory=Counter)  # replica id -> host runs and fallbacks it finished
    replica_lost: int = 0  # calls whose replica died or became unreachable (retried elsewhere)
    retried: int = 0  # calls that a second (or later) replica finished
    exhausted: int = 0  # requests no replica finished within ``attempts`` (the device got request_failed)

    def to_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "replica_lost": self.replica_lost, "retried": self.retried, "exhausted": self.exhausted}


class ClusterHost(HostServer):
    """The link ingress: devices connect here; host steps and fallbacks run on the Serve replicas."""

    def __init__(self, handle: Any, cluster: ClusterConfig, *, auth_token: str, policy: Policy | None = None,
                 config: HostConfig | None = None, ssl: SSLContext | None = None) -> None:
        super().__init__(None, None, auth_token=auth_token, policy=policy, config=config, ssl=ssl)  # type: ignore[arg-type]
        self.cluster = cluster
        self._handle = handle
        self.cluster_stats = ClusterStats()

    def node_loads(self) -> dict[str, dict[str, Any]]:
        """The replicas' last reported loads (with the router's count of requests each holds), by replica id."""
        return {k: dict(v) for k, v in NODE_LOADS.get(self.cluster.app_name, {}).items()}

    def conditions(self, network: tuple[float, float] | None = None) -> Conditions:
        """As the single host's, with the node load of the replica the router would pick (least loaded; the
        mean over replicas under round-robin) as host queue and utilisation (RISE's real-time node loads)."""
        base = super().conditions(network)
        loads = self.node_loads()
        if not loads:
            return dataclasses.replace(base, host_queue=0, host_utilisation=0.0)
        if self.cluster.routing == "least_loaded":
            target = least_loaded(loads)
            assert target is not None
            queue, busy = max(float(target.get("ongoing", 0)), float(target.get("queue", 0))), float(target.get("busy_fraction", 0.0))
        else:
            queue = sum(max(float(v.get("ongoing", 0)), float(v.get("queue", 0))) for v in loads.values()) / len(loads)
            busy = sum(float(v.get("busy_fraction", 0.0)) for v in loads.values()) / len(loads)
        return dataclasses.replace(base, host_queue=int(round(queue)), host_utilisation=min(max(busy, 0.0), 1.0))

    def node_load(self) -> NodeLoad:
        """The cluster's load as one node: requests the replicas hold, mean busy fraction and batch fill."""
        loads = list(self.node_loads().values())
        if not loads:
            return NodeLoad()
        n = len(loads)
        return NodeLoad(queue=int(sum(max(float(v.get("ongoing", 0)), float(v.get("queue", 0))) for v in loads)),
                        busy_fraction=sum(float(v.get("busy_fraction", 0.0)) for v in loads) / n,
                        batch_fill=sum(float(v.get("batch_fill", 0.0)) for v in loads) / n,
                        service_s=default_service(loads) if any(v.get("service_s") for v in loads) else 0.0)

    async def _host_run(self, request: Any, job: _Job) -> tuple[RelayState, float, int]:
        out = await self._call("host_run", {"request_id": job.request_id, "prompt": request.prompt, "relay_step": request.relay_step}, job)
        state = RelayState.from_bytes(out["state"])  # re-validated: a replica is trusted no more than a file
        return state, float(out["host_s"]), int(out["batch"])

    async def _fallback_run(self, state: RelayState, job: _Job) -> tuple[Any, float]:
        from safetensors.torch import load

        out = await self._call("fallback", {"request_id": job.request_id, "state": state.to_bytes()}, job)
        latents = load(out["latents"])["latents"]
        return latents, float(out["seconds"])

    async def _call(self, method: str, payload: dict[str, Any], job: _Job) -> dict[str, Any]:
        """Run ``method`` on a replica the router picks; a lost replica is retried on another, ``attempts`` in all.

        Raises:
            _Cancelled: the request was cancelled (device left or aborted, deadline passed) meanwhile.
            RelaydiffError: no replica finished it (the request then fails and the device generates alone).
        """
        from ray.exceptions import ActorUnavailableError, RayActorError

        last: Exception | None = None
        for attempt in range(self.cluster.attempts):
            job.check()
            call = {**payload, "routing": self.cluster.routing, "deadline_s": max(job.deadline - time.monotonic(), 1e-3)}
            response = getattr(self._handle, method).remote(call)
            try:
                out = await _await_response(response, job)
            except (RayActorError, ActorUnavailableError) as exc:
                last = exc
                self.cluster_stats.replica_lost += 1
                log.warning("request %r: replica lost during %s (attempt %d of %d): %s", job.request_id, method,
                            attempt + 1, self.cluster.attempts, type(exc).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            if "cancelled" in out:
                raise _Cancelled(str(out["cancelled"]), deadline=bool(out["deadline"]))
            self.cluster_stats.calls[str(out["replica"])] += 1
            self.cluster_stats.retried += attempt > 0
            return out
        self.cluster_stats.exhausted += 1
        raise RelaydiffError(f"no replica finished {method} of request {job.request_id!r} in {self.cluster.attempts} attempts: "
                             f"{type(last).__name__ if last else 'none'}")


async def _await_response(response: Any, job: _Job) -> dict[str, Any]:
    """Await a Serve response, cancelling it (and raising _Cancelled) as soon as the request is cancelled."""

    async def result() -> dict[str, Any]:
        return await response

    task = asyncio.ensure_future(result())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a cancelled call's error is expected, not lost
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            job.check()
    except _Cancelled:
        response.cancel()
        task.cancel()
        raise


# -- starting it ------------------------------------------------------------------------------------


def ray_init(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray (``address``, e.g. "auto") or start a local instance with ``num_cpus``; then Serve, without HTTP.

    Returns whether this call started a local Ray instance (the caller then shuts it down); False when it joined
    a running cluster or this process was already connected to one.
    """
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RelaydiffError(f"the cluster needs Ray Serve: pip install 'relaydiff[cluster]' ({exc})") from None
    started = False
    for attempt in (1, 2):  # Ray gives its raylet a fixed 30 s to register: a loaded machine may need a second try
        if ray.is_initialized():
            break
        try:
            ray.init(address=address or "local", num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
            started = address is None
        except Exception as exc:  # Ray raises bare Exception/ConnectionError kinds here
            ray.shutdown()
            if attempt == 2:
                raise RelaydiffError(f"Ray did not start ({address or 'local'}): {type(exc).__name__}: {exc}") from None
            log.warning("Ray did not start (%s: %s); trying once more", type(exc).__name__, exc)
    serve.start(proxy_location="Disabled")
    return started


def code_version(spec: ReplicaSpec) -> str:
    """The Serve code version of replicas running ``spec``: a digest of the spec, Ray's version and the source of
    the modules the replicas run. Deploying again with the same version updates the application in
    place (replica count, routing, user_config) instead of restarting every replica; anything else restarts them."""
    import hashlib
    import inspect
    import sys

    import ray

    from relaydiff.host import controller

    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:  # once per process: the code this process runs, not a later edit of the files
        src = hashlib.sha256(f"ray {ray.__version__}".encode())
        for module in (controller, sys.modules[__name__]):
            src.update(inspect.getsource(module).encode())
        _SOURCE_DIGEST = src.hexdigest()
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str).encode())
    h.update(_SOURCE_DIGEST.encode())
    return h.hexdigest()[:16]


_SOURCE_DIGEST: str | None = None


def deploy(cluster: ClusterConfig, spec: ReplicaSpec, *, replicas: int | None = None,
           slow: tuple[int, float] | None = None) -> Any:
    """Deploy the host replicas as a Serve application; returns its DeploymentHandle (Ray must be initialised).

    The deployment's version is :func:`code_version` of ``spec``: deploying the same spec again (another replica
    count, routing or ``slow``) updates the running application in place, without restarting its replicas
    (Serve 2.60 would otherwise give every ``serve.run`` a random code version and restart them all; Ray is pinned
    to 2.60.0, whose ``Deployment._version`` this sets).
    ``slow`` = (rank, factor) slows one replica down (benchmarks).
    """
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    # by import path, not the class: Serve would pickle a class by value, and its NODE_LOADS would be a copy
    router = RequestRouterConfig(request_router_class="relaydiff.host.cluster_router.LoadAwareRouter", request_router_kwargs={"routing": cluster.routing},
                                 request_routing_stats_period_s=cluster.stats_period_s,
                                 request_routing_stats_timeout_s=max(cluster.stats_period_s * 4, 2.0))
    options: dict[str, Any] = {
        "name": DEPLOYMENT, "max_ongoing_requests": cluster.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cluster.replica_num_cpus}, "request_router_config": router,
        "health_check_period_s": 2.0, "health_check_timeout_s": 10.0, "graceful_shutdown_timeout_s": 2.0,
        "user_config": {"slow_rank": slow[0], "slowdown": float(slow[1])} if slow is not None else {},
    }
    if cluster.min_replicas == cluster.max_replicas:
        options["num_replicas"] = cluster.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas, "max_replicas": cluster.max_replicas,
            "initial_replicas": cluster.initial_replicas(replicas), "target_ongoing_requests": cluster.target_ongoing_requests,
        }
    deployment = serve.deployment(HostReplica).options(**options)
    # Serve 2.60 took `version` out of options() but still deploys the one a Deployment carries (serve.run: its
    # `_version`, else a random string): set it, so that a redeploy of the same spec updates in place
    if hasattr(deployment, "_version"):
        deployment._version = code_version(spec)
    app = deployment.bind(spec)
    handle = serve.run(app, name=cluster.app_name, route_prefix=None)
    NODE_LOADS.pop(cluster.app_name, None)
    return handle


def app_exists(cluster: ClusterConfig) -> bool:
    """Whether the Serve application ``cluster.app_name`` is already deployed (by another command or process)."""
    from ray import serve

    return cluster.app_name in serve.status().applications


def undeploy(cluster: ClusterConfig) -> None:
    from ray import serve

    serve.delete(cluster.app_name)
    NODE_LOADS.pop(cluster.app_name, None)
