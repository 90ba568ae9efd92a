"""The Serve request router of the host replicas: least expected wait from each replica's reported load, or round-robin.

Serve builds one router per deployment handle, in the process holding the handle (the ingress), and hands
it each replica's ``record_routing_stats`` result (:class:`~relaydiff.host.controller.NodeLoad` plus its pid
and rank) as ``RunningReplica.routing_stats``. The decisions themselves are made by a
:class:`~relaydiff.host.cluster.RouteTable`: each request is assigned (and counted on its replica) when Serve
first asks about it, not when Serve later reports it routed (that comes after the replica's accept round trip,
so counting there let a whole burst of requests be decided on the same stale counts). The router publishes
each replica's load with its own in-flight count in ``relaydiff.host.cluster.NODE_LOADS`` for the ingress's
policy conditions.

The routing mode is the deployment's ``routing`` kwarg, unless a call's payload names one (``"routing"``: the
ingress's own ClusterConfig.routing, so that two ingresses can compare modes on the same replicas).

Kept apart from :mod:`relaydiff.host.cluster` because it imports Ray at module level (Serve needs the class).
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from relaydiff.host.cluster import ROUTINGS, RouteTable


class LoadAwareRouter(RequestRouter):
    """``least_loaded``: the replica with the least (requests held + 1) x seconds per request; ``round_robin``: in turn."""

    def initialize_state(self, routing: str = "least_loaded", **kwargs: Any) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.routing = routing
        self.table = RouteTable()
        self._stats: dict[str, dict[str, Any]] = {}  # replica id -> its last routing stats

    def _publish(self) -> None:
        _node_loads()[self.app_name] = self.table.loads(sorted(self._stats), self._stats)

    def _routing_of(self, pending_request: PendingRequest | None) -> str:
        args = getattr(pending_request, "args", None) or ()
        payload = args[0] if args and isinstance(args[0], dict) else {}
        routing = payload.get("routing", self.routing)
        return routing if routing in ROUTINGS else self.routing

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ids = sorted(by_id)
        stats = {rid: dict(r.routing_stats or {}) for rid, r in by_id.items()}
        key = pending_request.metadata.internal_request_id if pending_request is not None else None
        future = pending_request.future if pending_request is not None else None
        order = self.table.choose(key, ids, stats, self._routing_of(pending_request),
                                  cancelled=future.cancelled if future is not None else None)
        self._stats = stats
        self._publish()
        return [[by_id[rid]] for rid in order]  # one rank each: Serve tries them in this order (the next when one is full)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.table.routed(pending_request.metadata.internal_request_id, replica_id.unique_id)
        self._publish()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.table.completed(internal_request_id, replica_id.unique_id)
        self._publish()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.replica_gone(replica_id.unique_id)
        self._stats.pop(replica_id.unique_id, None)
        self._publish()


def _node_loads() -> dict[str, dict[str, dict[str, Any]]]:
    """The ingress's NODE_LOADS, looked up when called: Serve ships this class by value (cloudpickle), so a
    module-level reference would be a copy of the dict, not the one the ingress reads."""
    from relaydiff.host import cluster

    return cluster.NODE_LOADS
