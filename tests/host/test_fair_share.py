"""Fair-share admission (issue 19): quotas per client across its links, eviction for a client under its share,
round-robin host runs across clients. Each test reproduces what the per-link quota and the FIFO queue got wrong."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.ledger import Source
from relaydiff.link.events import DeviceCapabilities, Error, GenerateRequest, Progress
from relaydiff.link.transport import connect

CAPS = DeviceCapabilities(("torch",), "fair-share-test-device", "cd" * 32, 100.0)
OTHER = "fair-share-other-client-token"  # a second client's token (the fixtures' TOKEN is client "default")


def run(coro, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture()
def make_fair_host(tiny_pair, link_config, token):  # type: ignore[no-untyped-def]
    """make_fair_host(fraction, steps, **config) -> an unstarted HostServer with a second client, "other" (token OTHER)."""
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.policy import FixedPolicy
    from relaydiff.runtime.settings import GenerationSettings

    def make(fraction: float = 0.5, steps: int = 4, **config: Any) -> HostServer:
        cfg = HostConfig(settings=GenerationSettings(steps=steps), link=link_config, **config)
        return HostServer(tiny_pair[0], tiny_pair[1], auth_token=token, policy=FixedPolicy(fraction), config=cfg,
                          client_tokens={"other": OTHER})

    return make


async def _wait(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def _next_for(link, request_id: str):  # type: ignore[no-untyped-def]
    while True:
        event = await link.recv()
        if getattr(event, "request_id", None) == request_id and not isinstance(event, Progress):
            return event


def _exactly_once(host) -> Counter[Source]:  # type: ignore[no-untyped-def]
    """Every accepted request has exactly one recorded result; the sources counted."""
    entries = host.ledger.entries()
    assert len(entries) == host.stats.accepted and not host.ledger.pending() and host.ledger.refused_count == 0
    return Counter(e.source for e in entries)


def test_the_quota_is_per_client_across_its_links(make_fair_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    # before: a client opening more links got max_requests_per_session on each, however many links it opened
    host = make_fair_host(fraction=1.0, steps=400, max_requests_per_session=2, max_requests_per_client=3)

    async def main() -> tuple[Any, Any]:
        async with host:
            a, b = [await connect(host.url, auth_token=OTHER, capabilities=CAPS, config=link_config) for _ in range(2)]
            honest = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            for link, rid in ((a, "a0"), (a, "a1"), (b, "b0"), (b, "b1")):
                await link.send(GenerateRequest(rid, "a red circle", 0.5, 60.0))
            refused = await _next_for(b, "b1")  # the client's third request is its last
            await honest.send(GenerateRequest("h0", "a blue square", 0.5, 60.0))  # another client is not affected
            await _wait(lambda: host.stats.accepted == 4, "the honest request admitted")
            for link in (a, b, honest):
                await link.close()
            await _wait(lambda: not host.ledger.pending(), "every request ended")
            return refused, host.stats

    refused, stats = run(main())
    assert isinstance(refused, Error) and refused.code == "busy"
    assert re.match(r"retry_after_s=1; this client has 3 requests in progress; the cap is 3", refused.message)
    assert stats.busy == 1 and stats.evicted == 0 and stats.accepted == 4
    assert _exactly_once(host)[Source.CANCELLED] == 4


def test_a_full_queue_evicts_the_newest_queued_request_of_the_client_over_its_share(make_fair_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    # before: the honest client got busy while another client held the whole queue
    host = make_fair_host(fraction=1.0, steps=400, max_queue=4, max_batch=1, busy_retry_after_s=2.5)

    async def main() -> tuple[Any, Any, Any]:
        async with host:
            hog = await connect(host.url, auth_token=OTHER, capabilities=CAPS, config=link_config)
            for i in range(4):  # a0 runs (max_batch 1), a1..a3 wait in the queue: the queue is full
                await hog.send(GenerateRequest(f"a{i}", "a red circle", 0.5, 60.0))
            await _wait(lambda: host.stats.accepted == 4 and host._running == 1, "the hog's requests admitted")
            honest = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await honest.send(GenerateRequest("h0", "a blue square", 0.5, 60.0))
            evicted = await _next_for(hog, "a3")  # the newest queued one, answered busy once
            await _wait(lambda: host.stats.accepted == 5, "the honest request admitted")
            sessions = {s.client: s for s in host._links.values()}
            in_progress = {c: sorted(s.jobs) for c, s in sessions.items()}
            for link in (hog, honest):
                await link.close()
            await _wait(lambda: not host.ledger.pending(), "every request ended")
            return evicted, in_progress, host.stats

    evicted, in_progress, stats = run(main())
    assert isinstance(evicted, Error) and evicted.code == "busy" and evicted.request_id == "a3"
    assert evicted.message.startswith("retry_after_s=2.5; evicted") and "'default'" in evicted.message
    assert in_progress == {"other": ["a0", "a1", "a2"], "default": ["h0"]}
    assert stats.busy == 0 and stats.evicted == 1
    sources = _exactly_once(host)
    assert sources[Source.EVICTED] == 1 and sources[Source.CANCELLED] == 4
    (entry,) = [e for e in host.ledger.entries() if e.source is Source.EVICTED]
    assert entry.key.endswith("/a3")


def test_a_client_at_its_share_is_refused_not_evicting(make_fair_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_fair_host(fraction=1.0, steps=400, max_queue=4, max_batch=1)

    async def main() -> Any:
        async with host:
            hog = await connect(host.url, auth_token=OTHER, capabilities=CAPS, config=link_config)
            honest = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            for i in range(2):
                await hog.send(GenerateRequest(f"a{i}", "a red circle", 0.5, 60.0))
                await honest.send(GenerateRequest(f"h{i}", "a blue square", 0.5, 60.0))
            await _wait(lambda: host.stats.accepted == 4, "four admitted")
            await honest.send(GenerateRequest("h2", "a blue square", 0.5, 60.0))  # 2 of 4 already: its share
            refused = await _next_for(honest, "h2")
            for link in (hog, honest):
                await link.close()
            await _wait(lambda: not host.ledger.pending(), "every request ended")
            return refused

    refused = run(main())
    assert isinstance(refused, Error) and refused.code == "busy" and "the host has 4 requests in progress" in refused.message
    assert host.stats.evicted == 0 and host.stats.busy == 1 and _exactly_once(host)[Source.CANCELLED] == 4


def test_links_sharing_one_token_share_fairly_per_link(make_fair_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    # one client (a shared token): the host cannot tell its devices apart, but a link under its share of the
    # client's work still displaces the newest queued request of the link most over it
    host = make_fair_host(fraction=1.0, steps=400, max_queue=4, max_batch=1)

    async def main() -> Any:
        async with host:
            hog = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            for i in range(4):
                await hog.send(GenerateRequest(f"a{i}", "a red circle", 0.5, 60.0))
            await _wait(lambda: host.stats.accepted == 4, "the hog's requests admitted")
            other_device = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await other_device.send(GenerateRequest("h0", "a blue square", 0.5, 60.0))
            evicted = await _next_for(hog, "a3")
            for link in (hog, other_device):
                await link.close()
            await _wait(lambda: not host.ledger.pending(), "every request ended")
            return evicted

    evicted = run(main())
    assert isinstance(evicted, Error) and evicted.code == "busy" and "'default'" in evicted.message
    assert host.stats.evicted == 1 and host.stats.busy == 0 and _exactly_once(host)[Source.EVICTED] == 1


def test_host_runs_take_clients_round_robin(make_fair_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    # before: first come first served, so one client's backlog ran ahead of another client's request
    host = make_fair_host(fraction=0.5, steps=4, max_batch=1, batch_window_s=0.3, max_requests_per_session=8)

    async def main() -> list[str]:
        async with host:
            hog = await connect(host.url, auth_token=OTHER, capabilities=CAPS, config=link_config)
            honest = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            for i in range(3):
                await hog.send(GenerateRequest(f"a{i}", "a red circle", 0.5, 60.0))
            await honest.send(GenerateRequest("h0", "a blue square", 0.5, 60.0))  # within the first batch window
            order: list[str] = []

            async def progress(link) -> None:  # type: ignore[no-untyped-def]
                while len(order) < 4:
                    event = await link.recv()
                    if isinstance(event, Progress):
                        order.append(event.request_id)

            tasks = [asyncio.create_task(progress(x)) for x in (hog, honest)]
            await _wait(lambda: len(order) == 4, "four host runs")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in (hog, honest):
                await link.close()
            await _wait(lambda: not host.ledger.pending(), "every request ended")
            return order

    order = run(main())
    assert order == ["a0", "h0", "a1", "a2"]  # FIFO would have run h0 last
    assert host.batch_sizes == [1, 1, 1, 1]


def test_fair_order_interleaves_clients_then_links(make_fair_host) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.host.controller import _Job

    host = make_fair_host()
    request = host.config.settings.request("a prompt", 2)
    jobs = [_Job(rid, 1e18, client, link) for rid, client, link in (
        ("x1", "other", "s1"), ("x2", "other", "s1"), ("y1", "other", "s2"), ("d1", "default", "s3"), ("d2", "default", "s3"))]
    host._pending = [(request, job, None) for job in jobs]
    assert [p[1].request_id for p in host._fair_order()] == ["x1", "d1", "y1", "d2", "x2"]
    host._last_served["other"] = 5  # "other" was served last: "default" goes first
    assert [p[1].request_id for p in host._fair_order()] == ["d1", "x1", "d2", "y1", "x2"]


@pytest.mark.parametrize(("tokens", "match"), [
    ({"default": "a-long-enough-token-0001"}, "must be 1-64 of"),
    ({"bad name": "a-long-enough-token-0001"}, "must be 1-64 of"),
    ({"a": "same-token-twice-000001", "b": "same-token-twice-000001"}, "also another client's"),
    ({"a": "link-test-token"}, "also another client's"),  # the host's own token
    ({"a": ""}, "non-empty string"),
])
def test_client_tokens_are_checked(tiny_pair, tokens, match) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.host.controller import HostServer

    with pytest.raises(RelaydiffError, match=match):
        HostServer(tiny_pair[0], tiny_pair[1], auth_token="link-test-token", client_tokens=tokens)


def test_a_wrong_token_is_still_refused_with_client_tokens(make_fair_host, link_config) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.link.errors import ProtocolError

    host = make_fair_host()

    async def main() -> None:
        async with host:
            with pytest.raises((ProtocolError, Exception), match="auth"):
                await connect(host.url, auth_token="not-any-client-token", capabilities=CAPS, config=link_config)

    run(main())


def test_a_run_for_a_client_within_its_share_takes_no_work_of_a_client_over_it(make_fair_host) -> None:  # type: ignore[no-untyped-def]
    # before: the honest request shared its host run with up to max_batch - 1 requests of the client holding the queue
    from relaydiff.host.controller import _Job

    host = make_fair_host(max_queue=8, max_batch=8)
    request = host.config.settings.request("a prompt", 2)
    jobs = [_Job(f"x{i}", 1e18, "other", "s1") for i in range(6)] + [_Job("d1", 1e18, "default", "s2")]
    host._pending = [(request, job, None) for job in jobs]
    host._client_jobs.update({"other": 6, "default": 1})  # shares of 4: "other" is over its share
    host._last_served["other"] = 3
    assert [p[1].request_id for p in host._next_group()] == ["d1"]  # alone, not in a batch of 7
    host._last_served["default"] = 4  # then the over-share client's run may take anyone (here: its own backlog)
    assert [p[1].request_id for p in host._next_group()] == ["x0", "d1", "x1", "x2", "x3", "x4", "x5"]
    host._client_jobs.update({"other": -3})  # 3 and 1: nobody over its share, one batch for all
    host._last_served["default"] = 2
    assert [p[1].request_id for p in host._next_group()] == ["d1", "x0", "x1", "x2", "x3", "x4", "x5"]
