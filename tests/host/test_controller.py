"""HostServer on 127.0.0.1: exactly one result per accepted request, through faults, bad peers and load."""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect as ws_connect

from relaydiff.link.events import PROTOCOL_VERSION
from relaydiff.core.relay import relay
from relaydiff.core.state import RelayState
from relaydiff.host.ledger import Source, digest_bytes, digest_latents
from relaydiff.link import wire
from relaydiff.link.errors import PeerError
from relaydiff.link.events import DeviceCapabilities, Error, GenerateRequest, Ping, Pong, Progress, RelayHandoff, Result, ResultKind
from relaydiff.link.transport import connect
from relaydiff.runtime.client import RELAY
from relaydiff.runtime.device import encode_png
from relaydiff.runtime.settings import GenerationSettings

SETTINGS = GenerationSettings(steps=4)
CAPS = DeviceCapabilities(("torch",), "raw-test-device", "cd" * 32, 100.0)


def run(coro, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


def expected_latents(tiny_pair, prompt: str, k: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return relay(*tiny_pair, SETTINGS.request(prompt, k)).latents


async def recv_handoff(link) -> RelayState:  # type: ignore[no-untyped-def]
    """The next hand-off's relay state, parsed as the device runtime parses it."""
    progress = await link.recv()
    assert isinstance(progress, Progress) and progress.total == 4  # the host says k and N first
    handoff = await link.recv()
    assert isinstance(handoff, RelayHandoff)
    state = RelayState.from_bytes(handoff.relay_state)
    assert state.step_index == progress.step
    return state


def assert_exactly_once(host) -> None:  # type: ignore[no-untyped-def]
    assert host.ledger.pending() == [] and host.ledger.refused == []
    assert all(e.completed_at is not None for e in host.ledger.entries())


def test_device_vanishing_after_the_hand_off_is_cancelled(tiny_pair, make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5)

    async def main() -> None:
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
            handoff = await recv_handoff(link)
            assert handoff.step_index == 2
            await link.websocket.close()  # gone, without a Result or a Close event

    run(main())  # nobody would see the image: the host does not finish it (issue 19: work amplification)
    (entry,) = host.ledger.entries()
    assert entry.source is Source.CANCELLED and (entry.relay_step, entry.steps) == (2, 4)
    assert entry.error == "the device left" and entry.result_sha256 is None
    assert host.stats.cancelled == 1 and host.stats.deadline_exceeded == 0
    assert_exactly_once(host)


def test_a_device_that_vanishes_after_the_hand_off_of_a_host_only_request_gets_the_host_result(tiny_pair, make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=1.0)

    async def main() -> None:
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
            assert isinstance(await link.recv(), Progress)
            result = await link.recv()
            assert isinstance(result, Result) and result.kind is ResultKind.LATENT
            await link.websocket.close()

    run(main())
    (entry,) = host.ledger.entries()
    assert entry.source is Source.HOST and entry.result_sha256 == digest_latents(expected_latents(tiny_pair, "a red circle", 4))
    assert set(entry.timings) == {"host_s", "host_batch"} and entry.device_timings == {}
    assert_exactly_once(host)


def test_a_silent_device_gets_deadline_exceeded_and_no_host_work(tiny_pair, make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5, result_grace_s=0.0)

    async def main() -> Error:
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("r1", "a blue square", 0.5, 0.5))  # wants the image within 0.5 s
            await recv_handoff(link)
            error = await link.recv()  # the device stays silent
            await link.close()
            return error

    error = run(main())
    assert isinstance(error, Error) and error.code == "deadline_exceeded" and error.request_id == "r1"
    entry = host.ledger.get("s1/r1")
    assert entry.source is Source.CANCELLED and "within" in (entry.error or "")
    assert host.stats.deadline_exceeded == 1 and len(host.ledger) == 1
    assert_exactly_once(host)


def test_bad_peers_do_not_stop_the_host_serving_a_good_device(tiny_pair, make_host, make_client, token, link_config) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5)

    async def bad_token() -> None:
        with pytest.raises(PeerError, match="auth_failed"):
            await connect(host.url, auth_token="wrong", capabilities=CAPS, config=link_config)

    async def garbage() -> None:
        async with ws_connect(host.url, proxy=None) as ws:
            await ws.send(b"RDLK" + struct.pack("<HHII", PROTOCOL_VERSION, 3, 9999, 0))  # truncated GenerateRequest
            reply = wire.decode(await ws.recv(), max_message_bytes=1 << 20, max_json_bytes=1 << 16)
            assert isinstance(reply, Error) and reply.code == "bad_header"

    async def breaks_protocol_mid_request() -> None:
        """Accepted request, then nonsense: the link dies, the request is still finished (by the host)."""
        link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
        await link.send(GenerateRequest("r9", "a broken device", 0.5, 30.0))
        await link.websocket.send(b"RDLK\x01\x00\x63\x00" + b"\x00" * 8)  # unknown event type 99
        try:
            while True:
                await link.recv()
        except Exception:
            pass  # the host's Error, then the socket closes

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            results = await asyncio.gather(
                bad_token(), garbage(), breaks_protocol_mid_request(),
                make_client(host.url).generate("a good device"),
            )
            return results[-1]

    good = run(main())
    assert good.mode == RELAY and good.fallback_reason is None
    assert np.array_equal(good.image, relay(*tiny_pair, SETTINGS.request("a good device", 2)).images[0])
    sources = sorted((e.prompt, e.source.value) for e in host.ledger.entries())
    assert sources == [("a broken device", "cancelled"), ("a good device", "device")]
    assert_exactly_once(host)


def test_many_devices_at_once_every_request_answered_exactly_once(make_host, make_client) -> None:  # type: ignore[no-untyped-def]
    devices = 32
    host = make_host(fraction=None, workers=2)  # k from each device's quality preference
    prompts = [f"shape {i}" for i in range(devices)]

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            clients = [make_client(host.url, quality_preference=(i % 3) / 2) for i in range(devices)]
            return await asyncio.gather(*(c.generate(p) for c, p in zip(clients, prompts)))

    t0 = time.monotonic()
    outcomes = run(main(), timeout=60.0)
    seconds = time.monotonic() - t0
    assert [o.mode for o in outcomes] == [RELAY] * devices
    assert sorted(o.relay_step for o in outcomes) == sorted(round((0.2 + 0.3 * (i % 3)) * 4) for i in range(devices))
    entries = host.ledger.entries()
    assert len(entries) == devices and len({e.key for e in entries}) == devices
    assert all(e.source is Source.DEVICE for e in entries)
    by_prompt = {e.prompt: e for e in entries}
    for o in outcomes:
        assert by_prompt[o.prompt].result_sha256 == digest_bytes(encode_png(o.image))
    assert_exactly_once(host)
    assert seconds < 30, f"{devices} devices took {seconds:.1f} s"


def test_concurrent_host_steps_are_batched_and_match_unbatched_relays(tiny_pair, make_host, make_client) -> None:  # type: ignore[no-untyped-def]
    devices = 12
    host = make_host(fraction=0.5, max_batch=4, batch_window_s=0.05)
    prompts = [f"a red circle {i}" for i in range(devices)]

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            clients = [make_client(host.url) for _ in range(devices)]
            return await asyncio.gather(*(c.generate(p) for c, p in zip(clients, prompts)))

    outcomes = run(main(), timeout=60.0)
    assert [o.mode for o in outcomes] == [RELAY] * devices
    assert sum(host.batch_sizes) == devices and max(host.batch_sizes) > 1 and max(host.batch_sizes) <= 4
    assert_exactly_once(host)
    batches = {e.prompt: e.timings["host_batch"] for e in host.ledger.entries()}
    assert sorted(batches.values(), reverse=True)[0] > 1
    for o in outcomes:
        alone = relay(*tiny_pair, SETTINGS.request(o.prompt, 2)).images[0]
        assert np.abs(o.image.astype(int) - alone.astype(int)).max() <= 1, o.prompt


def test_bad_batch_settings_are_refused() -> None:
    from relaydiff.core.errors import RelaydiffError
    from relaydiff.host.controller import HostConfig

    with pytest.raises(RelaydiffError, match="max_batch must be a positive integer, got 0"):
        HostConfig(max_batch=0)
    with pytest.raises(RelaydiffError, match="batch_window_s"):
        HostConfig(batch_window_s=-1.0)


def test_a_contextual_policy_gets_the_probed_rtt_and_bandwidth(tiny_pair, make_client, link_config) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.policy import Conditions, ContextualPolicy
    from relaydiff.link.shaper import NetworkConditions, ShapingProxy

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[Conditions] = []

        def choose(self, request, capabilities, steps):  # type: ignore[no-untyped-def]
            raise AssertionError("a contextual policy is asked through choose_in")

        def choose_in(self, request, capabilities, steps, conditions):  # type: ignore[no-untyped-def]
            self.seen.append(conditions)
            return steps // 2

        def observe(self, request, relay_step, feedback) -> None:  # type: ignore[no-untyped-def]
            pass

    policy = Recorder()
    assert isinstance(policy, ContextualPolicy)
    host = HostServer(tiny_pair[0], tiny_pair[1], auth_token="link-test-token", policy=policy,
                      config=HostConfig(settings=SETTINGS, link=link_config))

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            port = int(host.url.rstrip("/").rsplit(":", 1)[1])
            async with ShapingProxy("127.0.0.1", port, NetworkConditions("slow", 150.0, 8.0)) as proxy:
                return await make_client(proxy.url()).generate("a red circle")

    outcome = run(main())
    assert outcome.mode == RELAY and outcome.relay_step == 2
    (seen,) = policy.seen
    assert seen.rtt_s is not None and 0.15 <= seen.rtt_s < 1.0
    # 64 KiB at 8 Mbit/s adds ~65 ms to the second Pong: the estimate lands near 8 Mbit/s
    assert seen.bandwidth_mbit_s is not None and 3.0 < seen.bandwidth_mbit_s < 12.0
    assert_exactly_once(host)


def test_a_device_latent_the_host_cannot_read_is_refused_for_that_request_only(tiny_pair, make_host, token, link_config) -> None:  # type: ignore[no-untyped-def]
    """The link carries a latent Result as bytes; the host parses it once and refuses a bad one with a request Error."""
    host = make_host(fraction=0.5)

    async def main() -> tuple[Error, Pong]:
        async with host:
            link = await connect(host.url, auth_token=token, capabilities=CAPS, config=link_config)
            await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
            await recv_handoff(link)
            await link.send(Result("r1", ResultKind.LATENT, b"not a safetensors buffer"))
            error = await link.recv()
            await link.send(Ping(7, 1.0))  # the link is still up
            pong = await link.recv()
            await link.close()
            return error, pong

    error, pong = run(main())
    assert isinstance(error, Error) and error.code == "request_failed" and error.request_id == "r1"
    assert "the latent is not a safetensors buffer" in error.message and isinstance(pong, Pong) and pong.nonce == 7
    (entry,) = host.ledger.entries()
    assert entry.source is Source.FAILED and "the device's result was refused" in (entry.error or "")
    assert host.stats.refused_results == 1
    assert_exactly_once(host)
