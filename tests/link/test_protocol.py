"""A host and a device Connection over an in-memory pipe exchange every event type; the wire layout is pinned."""

from __future__ import annotations

import struct

import pytest
import torch

from relaydiff.core.state import RelayState, latents_from_bytes, latents_to_bytes
from relaydiff.link import (
    EVENT_TYPES,
    NEED_DATA,
    Close,
    Connection,
    DeviceCapabilities,
    Error,
    ErrorCode,
    Event,
    Feedback,
    GenerateRequest,
    Hello,
    HelloAck,
    LinkConfig,
    Ping,
    Pong,
    Progress,
    RefineHandoff,
    RefineResult,
    RelayHandoff,
    RequestState,
    Result,
    ResultKind,
    Role,
    State,
)
from relaydiff.link import wire
from relaydiff.link.connection import ONLY_FROM, REQUEST_TRANSITIONS, TRANSITIONS

TOKEN = "correct horse battery staple"
CAPS = DeviceCapabilities(("coreml", "executorch"), "tiny-device-v1", "0123456789abcdef" * 4, 12.5)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the signature is all the protocol checks


def relay_state(step: int = 2, *, sampler: str = "ddim") -> RelayState:
    g = torch.Generator().manual_seed(0)
    return RelayState(
        latents=torch.randn(1, 4, 8, 8, generator=g),
        step_index=step,
        timesteps=torch.tensor([900, 700, 500, 300, 100]),
        sampler=sampler,
        scheduler_config={"num_train_timesteps": 1000},
        guidance_scale=3.0,
        prompt_embeds=torch.randn(1, 4, 8, generator=g),
        negative_prompt_embeds=torch.zeros(1, 4, 8),
        prompt="a red circle",
        seed=0,
        family_id="tiny",
    )


class Pipe:
    """Two connections joined back to back: what one sends, the other receives."""

    def __init__(self) -> None:
        self.device = Connection(Role.DEVICE, auth_token=TOKEN)
        self.host = Connection(Role.HOST, auth_token=TOKEN)

    def send(self, sender: Connection, event: Event) -> Event:
        receiver = self.host if sender is self.device else self.device
        receiver.receive_data(sender.send(event))
        got = receiver.next_event()
        assert receiver.next_event() is NEED_DATA
        assert got == event and type(got) is type(event)
        return got

    def handshake(self) -> "Pipe":
        self.send(self.device, self.device.hello(CAPS))
        assert self.host.state is State.HELLO_RECEIVED
        self.send(self.host, self.host.hello_ack("s1"))
        assert self.device.state is State.READY and self.host.state is State.READY
        return self


@pytest.fixture
def pipe() -> Pipe:
    return Pipe().handshake()


def test_every_event_type_crosses_the_pipe() -> None:
    p = Pipe()
    sent: set[type] = set()

    def send(sender: Connection, event: Event) -> Event:
        sent.add(type(event))
        return p.send(sender, event)

    hello = send(p.device, p.device.hello(CAPS))
    assert isinstance(hello, Hello) and hello.capabilities == CAPS and p.host.peer_hello == hello
    send(p.host, p.host.hello_ack("session-1"))
    # r1: relayed, the device reports the final latent, then feedback
    send(p.device, GenerateRequest("r1", "a red circle", 0.3, 5.0))
    send(p.host, Progress("r1", 1, 5))
    handoff = send(p.host, RelayHandoff("r1", relay_state().to_bytes()))
    assert isinstance(handoff, RelayHandoff) and handoff.relay_state == relay_state().to_bytes()  # bytes, untouched
    got = RelayState.from_bytes(handoff.relay_state)  # what the consumer does
    assert got.step_index == 2 and torch.equal(got.latents, relay_state().latents)
    send(p.device, Progress("r1", 5, 5))
    result = send(p.device, Result("r1", ResultKind.LATENT, latents_to_bytes(torch.ones(1, 4, 8, 8)), {"device_s": 0.4, "decode_s": 0.1}))
    assert isinstance(result, Result) and torch.equal(latents_from_bytes(result.data), torch.ones(1, 4, 8, 8))
    send(p.device, Feedback("r1", 1.25, 0.9))
    assert p.host.request_state("r1") is None and p.device.request_state("r1") is None
    # r2: the host ran every step and returns a PNG
    send(p.device, GenerateRequest("r2", "", 1.0, 30))
    send(p.host, Result("r2", ResultKind.PNG, PNG, {"host_s": 2.0}))
    assert p.host.request_state("r2") is RequestState.DONE
    send(p.device, Feedback("r2", 2.5, 0.75))
    # r3: refused by the host; the link stays up
    send(p.device, GenerateRequest("r3", "x", 0.5, 1))
    send(p.host, Error(ErrorCode.BUSY.value, "three requests in flight", request_id="r3"))
    assert p.host.state is State.READY and p.device.request_state("r3") is RequestState.DONE
    # probes both ways, with padding echoed
    ping = send(p.device, Ping(7, 123.5, b"\x55" * 1000))
    assert isinstance(ping, Ping)
    send(p.host, ping.pong(echo_padding=True))
    send(p.host, Ping(8, 0.0))
    send(p.device, Pong(8, 0.0))
    # r4 (protocol 2): the reverse hand-off, the device's preview latent refined on the host
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    refine = send(p.device, RefineHandoff("r4", latent=latents_to_bytes(lat), family_id="tiny", prompt="a red circle", steps=10,
                                                       sampler="ddim", guidance_scale=5.0, seed=3, strength=0.5))
    assert isinstance(refine, RefineHandoff) and torch.equal(latents_from_bytes(refine.latent), lat)
    assert p.host.request_state("r4") is RequestState.REFINING
    send(p.host, Progress("r4", 2, 5))
    send(p.host, RefineResult("r4", 0.5, 10, PNG, {"host_s": 0.2}))
    assert p.host.request_state("r4") is RequestState.DONE and p.device.request_state("r4") is RequestState.DONE
    send(p.device, Close("bye"))
    assert p.device.state is State.CLOSED and p.host.state is State.CLOSED
    assert sent == set(EVENT_TYPES.values())


def test_connection_level_error_then_close() -> None:
    p = Pipe().handshake()
    p.send(p.host, Error(ErrorCode.INTERNAL.value, "shutting down"))
    assert p.host.state is State.ERROR and p.device.state is State.ERROR
    p.send(p.device, Close())
    assert p.host.state is State.CLOSED


def test_closing_handshake_both_sides_send_close(pipe: Pipe) -> None:
    pipe.send(pipe.host, Close("maintenance"))
    assert pipe.device.state is State.CLOSED and pipe.host.state is State.CLOSED
    pipe.device.receive_data(wire.encode(Close()))  # a late answering Close is fine
    assert pipe.device.next_event() == Close()


def test_encode_decode_encode_is_identical() -> None:
    events = [
        Hello(Role.DEVICE, TOKEN, CAPS, 65536),
        HelloAck(Role.HOST, "s", 1 << 20),
        GenerateRequest("r-1.a:b", "ünïcødé prompt ✓", 0.25, 0.5),
        RelayHandoff("r", relay_state().to_bytes()),
        Progress("r", 0, 1),
        Result("r", ResultKind.PNG, PNG, {"a": 1}),
        Feedback("r", 0, 0),
        Error("timeout", "slow", None),
        Ping(2**32 - 1, 1e9, b"pad"),
        Pong(0, 0.0),
        Close(),
    ]
    for event in events:
        data = wire.encode(event)
        again = wire.decode(data, max_message_bytes=1 << 24, max_json_bytes=1 << 16)
        assert again == event and wire.encode(again) == data


def test_header_layout_is_pinned() -> None:
    """The example in docs/protocol.md: a Ping with nonce 7, timestamp 1.5 and 3 padding bytes."""
    data = wire.encode(Ping(7, 1.5, b"abc"))
    body = b'{"nonce":7,"timestamp":1.5}'
    assert data == b"RDLK" + struct.pack("<HHII", 2, 9, len(body), 3) + body + b"abc"
    assert data.hex() == (
        "52444c4b" "0200" "0900" "1b000000" "03000000"
        + body.hex() + "616263"
    )
    assert wire.HEADER_SIZE == 16


def test_type_codes_are_stable() -> None:
    assert {c: e.__name__ for c, e in EVENT_TYPES.items()} == {
        1: "Hello", 2: "HelloAck", 3: "GenerateRequest", 4: "RelayHandoff", 5: "Progress", 6: "Result",
        7: "Feedback", 8: "Error", 9: "Ping", 10: "Pong", 11: "Close", 12: "RefineHandoff", 13: "RefineResult",
    }


def test_tables_are_consistent() -> None:
    kinds = {k for (_, _, k) in TRANSITIONS}
    assert kinds == {e.__name__ for e in EVENT_TYPES.values()} | {"RequestError"}
    assert set(TRANSITIONS.values()) | {State.IDLE} == set(State)
    assert set(ONLY_FROM) <= kinds
    assert {k for (_, k) in REQUEST_TRANSITIONS} <= kinds


def test_relay_state_with_solver_history_survives() -> None:
    base = relay_state(sampler="dpmpp_2m")
    state = RelayState(**{**base.__dict__, "history": {"model_outputs.0": torch.ones(1, 4, 8, 8)},
                          "history_ints": {"lower_order_nums": 1}})
    got = RelayState.from_bytes(RelayHandoff("r", state.to_bytes()).relay_state)
    assert torch.equal(got.history["model_outputs.0"], torch.ones(1, 4, 8, 8))
    assert got.history_ints == {"lower_order_nums": 1} and got.sampler == "dpmpp_2m"


def test_optional_fields_are_omitted_on_the_wire() -> None:
    data = wire.encode(Error("busy", "no"))
    assert b"request_id" not in data
    host_hello = wire.encode(Hello(Role.HOST, TOKEN))
    assert b"capabilities" not in host_hello


def test_secret_is_not_printed() -> None:
    assert TOKEN not in repr(Hello(Role.DEVICE, TOKEN, CAPS))


def test_peer_cap_is_learned_from_the_handshake() -> None:
    small = Connection(Role.DEVICE, auth_token=TOKEN, config=LinkConfig(max_message_bytes=65536))
    host = Connection(Role.HOST, auth_token=TOKEN)
    host.receive_data(small.send(small.hello(CAPS)))
    host.next_event()
    assert host.peer_max_message_bytes == 65536
    small.receive_data(host.send(host.hello_ack()))
    assert isinstance(small.next_event(), HelloAck) and small.state is State.READY
    assert small.peer_max_message_bytes == LinkConfig().max_message_bytes


def test_error_to_event_round_trip() -> None:
    from relaydiff.link import RemoteProtocolError

    exc = RemoteProtocolError(ErrorCode.BAD_JSON, "x" * 5000)
    event = exc.to_event("r9")
    assert event.error_code is ErrorCode.BAD_JSON and event.request_id == "r9"
    assert len(event.message.encode()) <= 1024
    assert wire.decode(wire.encode(event), max_message_bytes=1 << 20, max_json_bytes=1 << 16) == event
