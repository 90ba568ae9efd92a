"""Admission control, deadlines, cancellation and bounded results: the host under abuse (issue 19)."""

from __future__ import annotations

import asyncio
import io
import re

import pytest
from PIL import Image

from relaydiff.host.ledger import Source
from relaydiff.link.events import (
    DeviceCapabilities, Error, Feedback, GenerateRequest, Progress, RelayHandoff, Result, ResultKind,
)
from relaydiff.link.transport import connect
from relaydiff.runtime.client import RELAY

CAPS = DeviceCapabilities(("torch",), "admission-test-device", "ef" * 32, 100.0)


def run(coro, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


def png(size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


async def next_for(link, request_id: str):  # type: ignore[no-untyped-def]
    """The next event about ``request_id`` (Progress is skipped)."""
    while True:
        event = await link.recv()
        if getattr(event, "request_id", None) == request_id and not isinstance(event, Progress):
            return event


def test_a_link_over_its_quota_gets_busy_with_a_retry_after(make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5, max_requests_per_session=2, busy_retry_after_s=2.5)

    async def main() -> list:  # type: ignore[type-arg]
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            for i in range(3):
                await link.send(GenerateRequest(f"r{i}", "a red circle", 0.5, 30.0))
            events = [await next_for(link, f"r{i}") for i in (2, 0, 1)]
            for e in events[1:]:
                await link.send(Result(e.request_id, ResultKind.PNG, png()))
            await asyncio.sleep(0.2)
            await link.close()
            return events

    busy, *handoffs = run(main())
    assert isinstance(busy, Error) and busy.code == "busy"
    assert re.match(r"retry_after_s=2\.5; this link has 2 requests in progress; the cap is 2", busy.message)
    assert all(isinstance(e, RelayHandoff) for e in handoffs)
    assert host.stats.busy == 1 and host.stats.accepted == 2 and len(host.ledger) == 2  # a refused request is not accepted


def test_the_global_queue_cap_refuses_with_busy(make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5, max_queue=2)

    async def main() -> list:  # type: ignore[type-arg]
        async with host:
            links = [await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config) for _ in range(3)]
            replies = []
            for i, link in enumerate(links):  # the first two stay in progress: their devices never answer
                await link.send(GenerateRequest("r", f"prompt {i}", 0.5, 30.0))
                replies.append(await next_for(link, "r"))
            for link in links:
                await link.close()
            return replies

    replies = run(main())
    assert [type(r).__name__ for r in replies] == ["RelayHandoff", "RelayHandoff", "Error"]
    assert replies[2].code == "busy" and "the host has 2 requests in progress; the cap is 2" in replies[2].message


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_and_told(make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5, batch_window_s=0.6)  # every host run waits 0.6 s for company

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("late", "a red circle", 0.5, 0.2))
            reply = await next_for(link, "late")
            await link.close()
            return reply

    reply = run(main())
    assert isinstance(reply, Error) and reply.code == "deadline_exceeded" and reply.request_id == "late"
    assert host.stats.skipped_host_runs == 1 and host.stats.deadline_exceeded == 1 and host.batch_sizes == []
    (entry,) = host.ledger.entries()
    assert entry.source is Source.CANCELLED and "deadline" in (entry.error or "")


def test_a_device_error_for_an_open_request_stops_the_host_and_the_link_stays_usable(make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=1.0, steps=400)  # a long host run: the abort arrives while it is queued or running

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("r1", "a red circle", 0.5, 60.0))
            await asyncio.sleep(0.3)
            await link.send(Error("request_failed", "the user went away", "r1"))
            while len(host.ledger.pending()):
                await asyncio.sleep(0.02)
            await link.send(Ping(3, 0.0))
            pong = await link.recv()  # no Progress or Result for r1 ever comes: the next event is our Pong
            await link.close()
            return pong

    from relaydiff.link.events import Ping, Pong

    pong = run(main())
    assert isinstance(pong, Pong) and pong.nonce == 3
    (entry,) = host.ledger.entries()
    assert entry.source is Source.CANCELLED and "aborted" in (entry.error or "")
    assert host.stats.stopped_between_steps + host.stats.skipped_host_runs == 1 and host.stats.failed == 0


def test_device_results_are_checked_and_device_timings_kept_apart(make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5, max_result_pixels=100)  # 10 x 10 at most

    async def main() -> list:  # type: ignore[type-arg]
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            replies = []
            for rid, blob in (("ok", png(4)), ("big", png(16)), ("junk", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)):
                await link.send(GenerateRequest(rid, "a red circle", 0.5, 30.0))
                assert isinstance(await next_for(link, rid), RelayHandoff)
                await link.send(Result(rid, ResultKind.PNG, blob, {"host_s": 999.0, "device_s": 0.5}))
                if rid != "ok":
                    replies.append(await next_for(link, rid))
            await link.close()
            return replies

    replies = run(main())
    assert [(r.code, r.request_id) for r in replies] == [("request_failed", "big"), ("request_failed", "junk")]
    assert "16x16 = 256 pixels; the cap is 100" in replies[0].message and "not a readable PNG" in replies[1].message
    ok, big, junk = (host.ledger.get(f"s1/{r}") for r in ("ok", "big", "junk"))
    assert ok.source is Source.DEVICE and ok.image_size == (4, 4)
    assert ok.timings["host_s"] != 999.0 and ok.device_timings == {"host_s": 999.0, "device_s": 0.5}
    assert big.source is junk.source is Source.FAILED and host.stats.refused_results == 2


def test_a_request_id_reused_after_its_feedback_is_served_again(make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5)
    loop_errors: list[dict] = []  # type: ignore[type-arg]

    async def main() -> list:  # type: ignore[type-arg]
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            answers = []
            for _ in range(2):
                await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
                answers.append(await next_for(link, "r1"))
                await link.send(Result("r1", ResultKind.PNG, png()))
                await link.send(Feedback("r1", 1.0, 0.5))
            await asyncio.sleep(0.2)
            await link.close()
            return answers

    answers = run(main())
    assert all(isinstance(a, RelayHandoff) for a in answers)
    keys = [e.key for e in host.ledger.entries()]
    assert len(keys) == 2 and keys[0] == "s1/r1" and keys[1].startswith("s1/r1#")
    assert all(e.source is Source.DEVICE and e.feedback is not None for e in host.ledger.entries())
    assert loop_errors == []  # no "Task exception was never retrieved"


def test_work_amplification_is_cancelled_and_an_honest_device_is_served(make_host, make_client, token, link_config) -> None:  # type: ignore[no-untyped-def]
    """20 links x 16 requests, closed at once: their queued work is dropped, the honest device relays."""
    host = make_host(fraction=0.5, steps=8)

    async def attacker(i: int):  # type: ignore[no-untyped-def]
        link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
        for j in range(16):
            await link.send(GenerateRequest(f"a{j}", f"attack {i} {j}", 1.0, 3600.0))
        return link

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            unloaded = await make_client(host.url, steps=8).generate("an honest circle")
            links = await asyncio.gather(*(attacker(i) for i in range(20)))
            while host.stats.accepted + host.stats.busy < 1 + 20 * 16:  # the host has admitted or refused them all
                await asyncio.sleep(0.02)
            for link in links:
                link.websocket.transport.abort()  # gone at once, without a Close
            loaded = await make_client(host.url, steps=8, deadline_s=30.0).generate("an honest square")
            return unloaded, loaded

    unloaded, loaded = run(main(), timeout=120.0)
    assert unloaded.mode == loaded.mode == RELAY and loaded.fallback_reason is None
    s = host.stats
    attack_accepted = s.accepted - 2
    assert 0 < attack_accepted <= host.config.max_queue and s.busy == 20 * 16 - attack_accepted
    # every admitted attack request ended cancelled; almost all without running a single host step
    assert s.cancelled == attack_accepted and s.skipped_host_runs + s.stopped_between_steps >= attack_accepted - host.config.max_batch
    sources = [e.source for e in host.ledger.entries()]
    assert sources.count(Source.DEVICE) == 2 and sources.count(Source.CANCELLED) == attack_accepted
    assert host.ledger.pending() == []


def test_a_bug_in_the_link_loop_is_logged_and_the_device_told(make_host, token, link_config, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    host = make_host(fraction=0.5)

    def broken_feedback(session, feedback) -> None:  # type: ignore[no-untyped-def]
        raise KeyError("a host bug")

    host._feedback = broken_feedback  # type: ignore[method-assign]

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
            assert isinstance(await next_for(link, "r1"), RelayHandoff)
            await link.send(Result("r1", ResultKind.PNG, png()))
            await link.send(Feedback("r1", 1.0, 0.5))
            return await link.recv()

    with caplog.at_level(logging.ERROR, logger="relaydiff.host.controller"):
        reply = run(main())
    assert isinstance(reply, Error) and reply.code == "internal" and reply.request_id is None and "KeyError" in reply.message
    assert any("link s1 failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert host.ledger.get("s1/r1").source is Source.DEVICE and host.ledger.pending() == []


def test_a_batched_run_drops_a_request_whose_device_left_and_finishes_the_others(make_host, token, link_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Three requests share one batched host run; one device leaves mid-run: it is stopped between steps, once."""
    import time
    from dataclasses import replace

    import relaydiff.core.relay as relay_module

    real_side = relay_module.relay_side

    def slow_side(model):  # type: ignore[no-untyped-def]
        side = real_side(model)
        inner = side.denoiser

        class Slow:  # at least 20 ms a step, so that the run is still going when the device leaves
            latent_spec, text_embed_dim = inner.latent_spec, inner.text_embed_dim

            def __call__(self, *args):  # type: ignore[no-untyped-def]
                time.sleep(0.02)
                return inner(*args)

        return replace(side, denoiser=Slow())

    monkeypatch.setattr(relay_module, "relay_side", slow_side)
    host = make_host(fraction=1.0, steps=60, max_batch=3, batch_window_s=0.3)  # the window gathers all three

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            links = [await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config) for _ in range(3)]
            for i, link in enumerate(links):
                await link.send(GenerateRequest("r", f"prompt {i}", 0.5, 120.0))
            while not host.batch_sizes:  # the batched run has started
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            links[1].websocket.transport.abort()  # gone mid-run, without a Close
            answers = []
            for i in (0, 2):  # the run takes a while on a loaded machine: wait through recv timeouts
                while True:
                    try:
                        answers.append(await next_for(links[i], "r"))
                        break
                    except TimeoutError:
                        continue
            for i in (0, 2):
                await links[i].close()
            return answers

    answers = run(main(), timeout=120.0)
    assert host.batch_sizes == [3]
    assert all(isinstance(a, Result) and a.kind is ResultKind.LATENT for a in answers)
    s = host.stats
    assert s.cancelled == 1 and s.stopped_between_steps == 1 and s.skipped_host_runs == 0 and s.failed == 0
    sources = sorted(e.source.value for e in host.ledger.entries())
    assert sources == sorted([Source.HOST.value, Source.HOST.value, Source.CANCELLED.value]) and host.ledger.pending() == []
    assert "left" in (host.ledger.get("s2/r").error or "")
