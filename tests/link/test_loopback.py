"""One real WebSocket link on 127.0.0.1: handshake, ping/pong, a relay round trip, and bad peers turned away."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import torch
from websockets.asyncio.client import connect as ws_connect

from relaydiff.core.state import RelayState, latents_to_bytes
from relaydiff.link import (
    Close,
    DeviceCapabilities,
    Error,
    ErrorCode,
    Feedback,
    GenerateRequest,
    HelloAck,
    LinkConfig,
    LocalProtocolError,
    PeerError,
    Ping,
    Pong,
    Progress,
    RelayHandoff,
    Result,
    ResultKind,
    Role,
    State,
)
from relaydiff.link import wire
from relaydiff.link.transport import Link, LinkServer, connect, serve

TOKEN = "loopback-token"
CAPS = DeviceCapabilities(("torch",), "tiny-device", "ab" * 32, 20.0)
CONFIG = LinkConfig(handshake_timeout_s=2.0, recv_timeout_s=5.0, send_timeout_s=5.0, close_timeout_s=0.5)


def relay_state(prompt: str) -> RelayState:
    return RelayState(
        latents=torch.full((1, 4, 8, 8), 0.5),
        step_index=3,
        timesteps=torch.tensor([900, 800, 600, 400, 200]),
        sampler="ddim",
        scheduler_config={"num_train_timesteps": 1000},
        guidance_scale=1.0,
        prompt_embeds=torch.zeros(1, 4, 8),
        prompt=prompt,
    )


async def host_handler(link: Link) -> None:
    """A toy host: answers pings, relays every request after 3 steps, and collects feedback."""
    while True:
        event = await link.recv()
        if isinstance(event, Pong):
            continue
        if isinstance(event, Ping):
            await link.send(event.pong(echo_padding=True))
        elif isinstance(event, GenerateRequest):
            await link.send(Progress(event.request_id, 3, 5))
            await link.send(RelayHandoff(event.request_id, relay_state(event.prompt).to_bytes()))
        elif isinstance(event, Result):
            await link.send(Ping(len(event.data), 0.0))  # tell the device how many bytes arrived
        elif isinstance(event, Feedback):
            await link.send(Pong(0, event.latency_s))  # echo, so the client can see it arrived
        elif isinstance(event, Close):
            return


def run(coro, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def good_session(server: LinkServer, prompt: str) -> None:
    link = await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=CONFIG)
    assert isinstance(link.peer_hello, HelloAck) and link.peer_hello.role is Role.HOST
    t0 = time.monotonic()
    await link.send(Ping(42, t0, b"\x00" * 4096))
    pong = await link.recv()
    assert isinstance(pong, Pong) and (pong.nonce, pong.timestamp, len(pong.padding)) == (42, t0, 4096)

    await link.send(GenerateRequest("req-1", prompt, 0.5, 10.0))
    assert await link.recv() == Progress("req-1", 3, 5)
    handoff = await link.recv()
    assert isinstance(handoff, RelayHandoff)
    state = RelayState.from_bytes(handoff.relay_state)  # the link carried bytes; the consumer parses them
    assert state.step_index == 3 and state.prompt == prompt
    assert torch.equal(state.latents, relay_state(prompt).latents)
    result = Result("req-1", ResultKind.LATENT, latents_to_bytes(state.latents * 2), {"device_s": 0.01})
    await link.send(result)
    ack = await link.recv()
    assert isinstance(ack, Ping) and ack.nonce == len(result.data)
    await link.send(ack.pong())
    await link.send(Feedback("req-1", 0.25, 1.0))
    assert await link.recv() == Pong(0, 0.25)
    await link.close("done")
    assert link.state is State.CLOSED


def test_handshake_ping_and_relay_round_trip() -> None:
    async def main() -> None:
        async with await serve(host_handler, auth_token=TOKEN, config=CONFIG) as server:
            assert server.host == "127.0.0.1" and server.port > 0 and server.url.startswith("ws://127.0.0.1:")
            await good_session(server, "a red circle")

    run(main())


def test_bad_peers_are_turned_away_while_a_good_one_is_served() -> None:
    async def bad_auth(server: LinkServer) -> None:
        with pytest.raises(PeerError, match="auth_failed") as info:
            await connect(server.url, auth_token="wrong", capabilities=CAPS, config=CONFIG)
        assert info.value.code == ErrorCode.AUTH_FAILED.value

    async def garbage(server: LinkServer) -> None:
        """A raw websocket client speaking nonsense gets an Error event and a protocol-error close."""
        async with ws_connect(server.url, proxy=None) as ws:
            await ws.send(b"RDLK" + struct.pack("<HHII", 7, 1, 2, 0) + b"{}")
            reply = wire.decode(await ws.recv(), max_message_bytes=1 << 20, max_json_bytes=1 << 16)
            assert isinstance(reply, Error) and reply.code == "unsupported_version" and "is 7" in reply.message
            await ws.wait_closed()
            assert ws.close_code == 1002

    async def text_frame(server: LinkServer) -> None:
        async with ws_connect(server.url, proxy=None) as ws:
            await ws.send("hello")
            reply = wire.decode(await ws.recv(), max_message_bytes=1 << 20, max_json_bytes=1 << 16)
            assert isinstance(reply, Error) and reply.code == "bad_header"

    async def main() -> None:
        async with await serve(host_handler, auth_token=TOKEN, config=CONFIG) as server:
            # a good device holds its link open while the bad ones come and go
            link = await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=CONFIG)
            await asyncio.gather(bad_auth(server), garbage(server), text_frame(server), good_session(server, "second"))
            await link.send(Ping(1, 0.0))
            assert await link.recv() == Pong(1, 0.0)
            await link.close()

    run(main())


def test_silent_peer_times_out_of_the_handshake() -> None:
    async def main() -> None:
        config = LinkConfig(handshake_timeout_s=0.2, close_timeout_s=0.2)
        async with await serve(host_handler, auth_token=TOKEN, config=config) as server:
            async with ws_connect(server.url, proxy=None) as ws:
                reply = wire.decode(await ws.recv(), max_message_bytes=1 << 20, max_json_bytes=1 << 16)
                assert isinstance(reply, Error) and reply.code == "timeout"

    run(main())


def test_oversized_messages_are_refused_on_both_sides() -> None:
    async def main() -> None:
        small = LinkConfig(max_message_bytes=64 * 1024, close_timeout_s=0.2)
        async with await serve(host_handler, auth_token=TOKEN, config=small) as server:
            # our core knows the host's cap from HelloAck and refuses before the socket sees the message
            link = await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=CONFIG)
            assert link.connection.peer_max_message_bytes == 64 * 1024
            with pytest.raises(LocalProtocolError, match="the peer accepts at most 65536"):
                await link.send(Ping(1, 0.0, b"x" * 70_000))
            await link.close()
            # a peer that ignores the cap is cut off by websockets' max_size (close code 1009)
            async with ws_connect(server.url, proxy=None, max_size=None) as ws:
                await ws.send(b"RDLK" + b"\x00" * 70_000)
                await ws.wait_closed()
                assert ws.close_code == 1009

    run(main())


def test_recv_timeout_leaves_the_link_open() -> None:
    async def main() -> None:
        async with await serve(host_handler, auth_token=TOKEN, config=CONFIG) as server:
            link = await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=CONFIG)
            with pytest.raises(TimeoutError):
                await link.recv(timeout=0.05)
            await link.send(Ping(5, 1.0))
            assert await link.recv() == Pong(5, 1.0)
            await link.close()

    run(main())


def test_serve_accepts_an_ssl_parameter() -> None:
    async def main() -> None:
        server = await serve(host_handler, auth_token=TOKEN, config=CONFIG, ssl=None)
        assert server.url.startswith("ws://")
        await server.close()

    run(main())


def test_a_large_message_before_the_hello_is_refused_unread_and_the_cap_rises_after_it() -> None:
    async def main() -> None:
        async with await serve(host_handler, auth_token=TOKEN, config=CONFIG) as server:
            async with ws_connect(server.url, proxy=None, max_size=None) as ws:
                await ws.send(b"RDLK" + struct.pack("<HHII", 2, 4, 2, 1 << 20) + b"{}" + bytes(1 << 20))  # 1 MiB "hand-off"
                await ws.wait_closed()
                assert ws.close_code == 1009  # websockets refused it from the frame header: never buffered nor parsed
            link = await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=CONFIG)
            padding = bytes(256 * 1024)  # after the handshake the full cap applies
            await link.send(Ping(5, 0.0, padding))
            pong = await link.recv()
            assert isinstance(pong, Pong) and pong.nonce == 5
            await link.close()

    run(main())


def test_failed_logins_lock_an_address_out_for_the_window(caplog) -> None:  # type: ignore[no-untyped-def]
    import dataclasses
    import logging

    config = dataclasses.replace(CONFIG, max_failed_logins=3, failed_login_window_s=30.0)

    async def main() -> None:
        async with await serve(host_handler, auth_token=TOKEN, config=config) as server:
            for _ in range(3):
                with pytest.raises(PeerError, match="auth_failed"):
                    await connect(server.url, auth_token="guess-" + "x" * 10, capabilities=CAPS, config=config)
            with pytest.raises(PeerError, match="too many failed logins from this address; retry in 30 s"):
                await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=config)  # even the right token

    with caplog.at_level(logging.INFO, logger="relaydiff.link.transport"):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("link refused peer=127.0.0.1 code=auth_failed" in m for m in messages) == 4
    assert not any(TOKEN in m or "guess-" in m for m in messages)  # no secret, right or wrong, is logged


def test_the_login_limiter_forgets_failures_after_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as time_module

    from relaydiff.link.transport import LoginLimiter

    now = [1000.0]
    monkeypatch.setattr(time_module, "monotonic", lambda: now[0])
    limiter = LoginLimiter(max_failures=2, window_s=10.0)
    limiter.failed("10.0.0.1")
    assert limiter.locked_for("10.0.0.1") == 0.0
    now[0] += 4.0
    limiter.failed("10.0.0.1")
    assert limiter.locked_for("10.0.0.1") == pytest.approx(6.0) and limiter.locked_for("10.0.0.2") == 0.0
    now[0] += 6.5
    assert limiter.locked_for("10.0.0.1") == 0.0  # the first failure left the window
