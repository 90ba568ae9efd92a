"""The Serve request router of the host replicas: least expected wait from each replica's reported load, or round-robin.

Serve builds one router per deployment handle, in the process holding the handle (the ingress), and hands
it each replica's ``record_routing_stats`` result (:class:`~relaydiff.host.controller.NodeLoad` plus its pid
and rank) as ``RunningReplica.routing_stats``. The router adds its own count of the requests it has sent each
replica and not yet seen finish (fresher than the stats, which come every ``stats_period_s``) and publishes
both in ``relaydiff.host.cluster.NODE_LOADS`` for the ingress's policy conditions.

Kept apart from :mod:`relaydiff.host.cluster` because it imports Ray at module level (Serve needs the class).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from relaydiff.host.cluster import ROUTINGS, default_service, expected_wait


class LoadAwareRouter(RequestRouter):
    """``least_loaded``: the replica with the least (requests held + 1) x seconds per request; ``round_robin``: in turn."""

    def initialize_state(self, routing: str = "least_loaded", **kwargs: Any) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.routing = routing
        self._turn = 0
        self._held: Counter[str] = Counter()  # replica id -> requests sent and not yet finished
        self._requests: dict[str, str] = {}  # internal request id -> replica id

    def _loads(self, replicas: list[RunningReplica]) -> dict[str, dict[str, Any]]:
        loads = {}
        for r in replicas:
            rid = r.replica_id.unique_id
            loads[rid] = {**(r.routing_stats or {}), "ongoing": self._held[rid]}
        _node_loads()[self.app_name] = loads
        return loads

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not replicas:
            return []
        loads = self._loads(replicas)
        if self.routing == "round_robin":
            i = self._turn % len(replicas)  # the turn moves on when a request is routed (Serve may ask several times per request)
            order = replicas[i:] + replicas[:i]
        else:
            default = default_service(list(loads.values()))
            order = sorted(replicas, key=lambda r: expected_wait(loads[r.replica_id.unique_id], default))
        return [[r] for r in order]  # one rank each: Serve tries them in this order (the next when one is full)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._held[replica_id.unique_id] += 1
        self._turn += 1
        self._requests[pending_request.metadata.internal_request_id] = replica_id.unique_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._requests.pop(internal_request_id, replica_id.unique_id)
        if self._held[rid] > 0:
            self._held[rid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._held.pop(replica_id.unique_id, None)
        _node_loads().get(self.app_name, {}).pop(replica_id.unique_id, None)


def _node_loads() -> dict[str, dict[str, dict[str, Any]]]:
    """The ingress's NODE_LOADS, looked up when called: Serve ships this class by value (cloudpickle), so a
    module-level reference would be a copy of the dict, not the one the ingress reads."""
    from relaydiff.host import cluster

    return cluster.NODE_LOADS
