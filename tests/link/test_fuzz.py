"""Fuzzing the core: whatever bytes arrive, next_event() raises RemoteProtocolError or returns an event, nothing else."""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaydiff.core.state import RelayState, latents_to_bytes
from relaydiff.link import (
    EVENT_TYPES,
    NEED_DATA,
    Close,
    Connection,
    DeviceCapabilities,
    Error,
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
    RemoteProtocolError,
    Result,
    ResultKind,
    Role,
    State,
)
from relaydiff.link import wire

TOKEN = "fuzz-token"
CAPS = DeviceCapabilities(("coreml",), "b", "0" * 64, 1.0)
CONFIG = LinkConfig(max_message_bytes=256 * 1024, max_json_bytes=8 * 1024)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STATE = RelayState(
    latents=torch.zeros(1, 4, 4, 4),
    step_index=1,
    timesteps=torch.tensor([500, 250]),
    sampler="euler",
    scheduler_config={"a": 1},
    guidance_scale=2.0,
    prompt_embeds=torch.ones(1, 2, 4),
    negative_prompt_embeds=torch.zeros(1, 2, 4),
    sigmas=torch.tensor([1.0, 0.5, 0.0]),
)
RELAY_BLOB = STATE.to_bytes()

# valid messages of every type, as sent to a READY peer with request "r1" open
CORPUS = [
    wire.encode(e)
    for e in (
        Hello(Role.DEVICE, TOKEN, CAPS),
        HelloAck(Role.HOST, "s"),
        GenerateRequest("r2", "prompt", 0.5, 3.0),
        RelayHandoff("r1", RELAY_BLOB),
        Progress("r1", 1, 2),
        Result("r1", ResultKind.PNG, b"\x89PNG\r\n\x1a\n"),
        Result("r1", ResultKind.LATENT, latents_to_bytes(torch.zeros(1, 4, 2, 2)), {"t": 1.0}),
        Feedback("r1", 1.0, 0.5),
        Error("busy", "no", "r1"),
        Ping(1, 2.0, b"pad"),
        Pong(1, 2.0),
        Close("x"),
        RefineHandoff("r3", latent=latents_to_bytes(torch.zeros(1, 4, 2, 2)), family_id="f", prompt="p", steps=4, sampler="ddim",
                                   guidance_scale=2.0, seed=0, strength=0.5),
        RefineResult("r1", 0.5, 4, b"\x89PNG\r\n\x1a\n"),
    )
]


def fresh(role: Role) -> Connection:
    return Connection(role, auth_token=TOKEN, config=CONFIG)


def ready(role: Role) -> Connection:
    """A connection of ``role`` in READY with request "r1" open (relayed, for a device)."""
    device, host = fresh(Role.DEVICE), fresh(Role.HOST)
    host.receive_data(device.send(device.hello(CAPS)))
    host.next_event()
    device.receive_data(host.send(host.hello_ack()))
    device.next_event()
    host.receive_data(device.send(GenerateRequest("r1", "p", 0.5, 1)))
    host.next_event()
    return device if role is Role.DEVICE else host


def feed(conn: Connection, messages: list[bytes]) -> None:
    """Only RemoteProtocolError may escape, and it leaves the connection in ERROR."""
    for data in messages:
        conn.receive_data(data)
        try:
            while conn.next_event() is not NEED_DATA:
                pass
        except RemoteProtocolError:
            assert conn.state is State.ERROR


roles = st.sampled_from([Role.HOST, Role.DEVICE])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(role=roles, handshaken=st.booleans(), messages=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_arbitrary_bytes(role: Role, handshaken: bool, messages: list[bytes]) -> None:
    feed(ready(role) if handshaken else fresh(role), messages)


@FUZZ
@given(role=roles, messages=st.lists(st.binary(max_size=64), min_size=1, max_size=3), prefix=st.sampled_from([b"RDLK\x01\x00", b"RDLK\x02\x00", b"RDLK"]))
def test_bytes_behind_a_valid_magic(role: Role, messages: list[bytes], prefix: bytes) -> None:
    feed(ready(role), [prefix + m for m in messages])


@FUZZ
@given(
    role=roles,
    type_code=st.sampled_from(sorted(EVENT_TYPES)),
    obj=st.dictionaries(
        st.sampled_from(["request_id", "prompt", "step", "total", "kind", "timings", "code", "message", "nonce",
                         "timestamp", "role", "auth_token", "capabilities", "max_message_bytes", "protocol_version",
                         "session_id", "quality_preference", "deadline_s", "latency_s", "quality", "reason", "x"]),
        json_values,
        max_size=8,
    ),
    blob=st.binary(max_size=64),
)
def test_well_framed_arbitrary_json(role: Role, type_code: int, obj: dict, blob: bytes) -> None:
    body = json.dumps(obj).encode()
    data = b"RDLK" + struct.pack("<HHII", 2, type_code, len(body), len(blob)) + body + blob
    feed(ready(role), [data])
    feed(fresh(role), [data])


@FUZZ
@given(
    role=roles,
    index=st.integers(0, len(CORPUS) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 10**6),
    insert=st.binary(max_size=8),
)
def test_mutated_valid_messages(role: Role, index: int, edits: list[tuple[int, int]], cut: int | None, insert: bytes) -> None:
    data = bytearray(CORPUS[index])
    for pos, byte in edits:
        data[pos % len(data)] = byte
    if insert:
        at = (cut or 0) % (len(data) + 1)
        data[at:at] = insert
    elif cut is not None:
        del data[cut % (len(data) + 1) :]
    feed(ready(role), [bytes(data)])


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(RELAY_BLOB) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_relay_states(edits: list[tuple[int, int]]) -> None:
    """Bytes flipped anywhere in a relay state (header JSON, dtypes, shapes, tensor data) are refused cleanly."""
    blob = bytearray(RELAY_BLOB)
    for pos, byte in edits:
        blob[pos] = byte
    body = b'{"request_id":"r1"}'
    data = b"RDLK" + struct.pack("<HHII", 2, 4, len(body), len(blob)) + body + bytes(blob)
    device = ready(Role.DEVICE)
    feed(device, [data])
