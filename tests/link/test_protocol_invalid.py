"""Every way a peer (or we) can break the protocol ends in a typed error with a code, and the connection in ERROR."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from relaydiff.link.events import PROTOCOL_VERSION
from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.state import RelayState, latents_from_bytes
from relaydiff.link import (
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
    LocalProtocolError,
    Ping,
    Progress,
    RelayHandoff,
    RemoteProtocolError,
    Result,
    ResultKind,
    Role,
    State,
)
from relaydiff.link import wire

TOKEN = "s3cret-token"
CAPS = DeviceCapabilities(("executorch",), "tiny-device-v1", "f" * 64, 4.0)


def relay_state() -> RelayState:
    return RelayState(
        latents=torch.zeros(1, 4, 8, 8),
        step_index=1,
        timesteps=torch.tensor([750, 500, 250]),
        sampler="ddim",
        scheduler_config={},
        guidance_scale=1.0,
        prompt_embeds=torch.zeros(1, 4, 8),
    )


def frame(type_code: int, body: bytes | str, blob: bytes = b"", *, version: int = 2, magic: bytes = b"RDLK") -> bytes:
    body = body.encode("utf-8") if isinstance(body, str) else body
    return magic + struct.pack("<HHII", version, type_code, len(body), len(blob)) + body + blob


def host(config: LinkConfig | None = None) -> Connection:
    return Connection(Role.HOST, auth_token=TOKEN, config=config)


def ready_pair() -> tuple[Connection, Connection]:
    device, h = Connection(Role.DEVICE, auth_token=TOKEN), host()
    h.receive_data(device.send(device.hello(CAPS)))
    h.next_event()
    device.receive_data(h.send(h.hello_ack()))
    device.next_event()
    return device, h


def refuse(conn: Connection, data: bytes, code: ErrorCode, match: str | None = None) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        conn.next_event()
    assert info.value.code is code, info.value
    assert conn.state is State.ERROR
    return info.value


def hello_json(**override: object) -> str:
    obj = json.loads(wire.encode(Hello(Role.DEVICE, TOKEN, CAPS))[16:])
    obj.update(override)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


# -- framing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"RDLK", b"RDLK\x01\x00\x01\x00" + b"\x00" * 7])
def test_short_header(data: bytes) -> None:
    refuse(host(), data, ErrorCode.BAD_HEADER, "the header alone is 16")


def test_bad_magic_is_quoted() -> None:
    refuse(host(), frame(1, hello_json(), magic=b"HTTP"), ErrorCode.BAD_HEADER, r"magic is b'HTTP'; expected b'RDLK'")


def test_oversized_message_is_refused_before_parsing() -> None:
    conn = host(LinkConfig(max_message_bytes=65536))
    refuse(conn, b"RDLK" + b"\xff" * 70000, ErrorCode.MESSAGE_TOO_LARGE, "70004 bytes before the handshake; the cap is 8192")
    device = Connection(Role.DEVICE, auth_token=TOKEN)
    conn = host(LinkConfig(max_message_bytes=65536))
    conn.receive_data(device.send(device.hello(CAPS)))
    conn.next_event()
    conn.send(conn.hello_ack())
    refuse(conn, b"RDLK" + b"\xff" * 70000, ErrorCode.MESSAGE_TOO_LARGE, "70004 bytes; the cap is 65536")


def test_nothing_but_a_small_hello_is_parsed_before_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    decode = wire.decode
    monkeypatch.setattr(wire, "decode", lambda data, **kw: parsed.append(data) or decode(data, **kw))
    state = relay_state().to_bytes()
    refuse(host(), frame(4, '{"request_id":"r1"}', state), ErrorCode.UNEXPECTED_EVENT, "sent RelayHandoff in state IDLE")
    refuse(host(), frame(3, '{"request_id":"r1","prompt":"x","quality_preference":0.5,"deadline_s":1}'),
           ErrorCode.UNEXPECTED_EVENT, "sent GenerateRequest in state IDLE")
    refuse(host(), frame(1, "{" + " " * 9000 + "}"), ErrorCode.MESSAGE_TOO_LARGE, "before the handshake; the cap is 8192")
    assert parsed == []  # refused from the header alone


def test_a_relay_handoff_from_a_device_is_refused_by_role_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    _, h = ready_pair()

    def no_parse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the relay state was parsed before the role check")

    monkeypatch.setattr(RelayState, "from_bytes", no_parse)
    refuse(h, frame(4, '{"request_id":"r1"}', relay_state().to_bytes()), ErrorCode.UNEXPECTED_EVENT,
           "RelayHandoff is sent by the host only; the sender is the device")


def test_oversized_json() -> None:
    conn = host(LinkConfig(max_json_bytes=100))
    refuse(conn, frame(1, " " * 101), ErrorCode.MESSAGE_TOO_LARGE, "JSON is 101 bytes; the cap is 100")


def test_blob_above_the_event_cap_is_refused_from_the_header() -> None:
    data = b"RDLK" + struct.pack("<HHII", 2, 9, 2, 5 * 1024 * 1024) + b"{}"  # Ping padding cap is 4 MiB
    refuse(ready_pair()[1], data, ErrorCode.MESSAGE_TOO_LARGE, "blob cap is 4194304")


def test_blob_on_an_event_without_one() -> None:
    refuse(host(), frame(1, hello_json(), b"x"), ErrorCode.BAD_BLOB, "carries no blob")


@pytest.mark.parametrize("cut", [17, 40, -1])
def test_truncated_frames(cut: int) -> None:
    data = wire.encode(Hello(Role.DEVICE, TOKEN, CAPS))
    refuse(host(), data[:cut], ErrorCode.BAD_HEADER, "truncated: header declares")


def test_trailing_bytes() -> None:
    refuse(host(), wire.encode(Hello(Role.DEVICE, TOKEN, CAPS)) + b"\x00", ErrorCode.BAD_HEADER, "trailing bytes")


def test_wrong_header_version_names_both_versions() -> None:
    err = refuse(host(), frame(1, hello_json(), version=1), ErrorCode.UNSUPPORTED_VERSION, "version is 1")
    assert "speaks 2" in str(err)


def test_wrong_hello_version() -> None:
    refuse(host(), frame(1, hello_json(protocol_version=3)), ErrorCode.UNSUPPORTED_VERSION, "version is 3; expected 2")


def test_unknown_event_type() -> None:
    refuse(host(), frame(99, "{}"), ErrorCode.UNKNOWN_EVENT, "event type 99 is unknown; known: 1 \\(Hello\\)")


# -- JSON and schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[]", "is a list; expected an object"),
        ('"hello"', "is a str"),
        ("null", "is a NoneType"),
        ("{", "invalid"),
        (b"\xff\xfe{}", "invalid"),
        ('{"a": NaN}', "NaN is not allowed"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("[" * 4000 + "]" * 4000, "invalid"),  # too deep (and still under the 8 KiB pre-handshake cap)
    ],
)
def test_json_that_is_not_a_clean_object(body: str | bytes, match: str) -> None:
    refuse(host(), frame(1, body), ErrorCode.BAD_JSON, match)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"role": None}, r"lacks required keys \['role'\]"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"role": "server"}, r"Hello.role is 'server'; expected one of \['host', 'device'\]"),
        ({"max_message_bytes": True}, "max_message_bytes is True; expected an integer"),
        ({"max_message_bytes": 1.5e6}, "max_message_bytes is 1500000.0"),
        ({"max_message_bytes": 10}, r"is 10; expected an integer in \[65536"),
        ({"auth_token": ""}, "1 to 256 UTF-8 bytes, got 0"),
        ({"capabilities": None}, "capabilities exactly when role is device"),
        ({"capabilities": [1]}, "expected a JSON object"),
        ({"capabilities": {"runtimes": []}}, "lacks required keys"),
        ({"capabilities": {**CAPS.to_json(), "runtimes": ["CoreML!"]}}, r"runtimes\[0\] is 'CoreML!'"),
        ({"capabilities": {**CAPS.to_json(), "bundle_sha256": "xyz"}}, "bundle_sha256 is 'xyz'"),
        ({"capabilities": {**CAPS.to_json(), "steps_per_second": 0}}, r"steps_per_second is 0; expected a finite number in \(0.0"),
        ({"capabilities": {**CAPS.to_json(), "steps_per_second": "fast"}}, "steps_per_second is 'fast'; expected a number"),
    ],
)
def test_hello_schema(override: dict, match: str) -> None:
    refuse(host(), frame(1, hello_json(**override)), ErrorCode.INVALID_FIELD, match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"quality_preference": 1.5}, r"quality_preference is 1.5; expected a finite number in \[0.0, 1.0\]"),
        ({"quality_preference": "high"}, "quality_preference is 'high'; expected a number"),
        ({"deadline_s": 0}, "deadline_s is 0"),
        ({"prompt": "x" * 4097}, "0 to 4096 UTF-8 bytes, got 4097"),
        ({"prompt": "\ud800"}, "no lone surrogates"),
        ({"request_id": "has space"}, "request_id is 'has space'; expected a string matching"),
        ({"request_id": 7}, "request_id is 7; expected a string"),
    ],
)
def test_generate_request_schema(fields: dict, match: str) -> None:
    device, h = ready_pair()
    obj = {"request_id": "r1", "prompt": "p", "quality_preference": 0.5, "deadline_s": 5.0, **fields}
    refuse(h, frame(3, json.dumps(obj)), ErrorCode.INVALID_FIELD, match)


def test_overflowing_numbers() -> None:
    device, h = ready_pair()
    body = '{"request_id":"r","prompt":"","quality_preference":0.5,"deadline_s":1e999}'
    refuse(h, frame(3, body), ErrorCode.INVALID_FIELD, "deadline_s is inf; expected a finite number")
    device, h = ready_pair()
    body = '{"request_id":"r","prompt":"","quality_preference":0.5,"deadline_s":' + "9" * 400 + "}"
    refuse(h, frame(3, body), ErrorCode.INVALID_FIELD, "deadline_s is 9999")


def test_progress_step_beyond_total() -> None:
    refuse(ready_pair()[1], frame(5, '{"request_id":"r","step":6,"total":5}'), ErrorCode.INVALID_FIELD, "step is 6; expected at most total = 5")


def test_error_code_must_be_known() -> None:
    refuse(host(), frame(8, '{"code":"oops","message":""}'), ErrorCode.INVALID_FIELD, "Error.code is 'oops'")


# -- blobs: relay states and results -----------------------------------------------------------


def rewrite(state: RelayState, **tensors: torch.Tensor) -> bytes:
    data = state.to_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    return save({**load(data), **tensors}, metadata=meta)


BAD_STATES = [
    (rewrite(relay_state(), latents=torch.full((1, 4, 8, 8), float("nan"))), "latents contain NaN"),
    (rewrite(relay_state(), latents=torch.zeros(4, 8, 8)), r"latents must be a 4-D tensor .* got shape \(4, 8, 8\)"),
    (rewrite(relay_state(), prompt_embeds=torch.zeros(2, 4, 8)), "prompt_embeds must be"),
    (b"garbage" * 10, "not a valid safetensors buffer"),
    (b"", "not a valid safetensors buffer"),
]


@pytest.mark.parametrize(("blob", "match"), BAD_STATES)
def test_the_link_carries_a_bad_state_as_bytes_and_its_consumer_refuses_it(blob: bytes, match: str) -> None:
    """The link core caps the blob and never parses it (no torch in relaydiff.link); RelayState.from_bytes, which
    the device runtime calls once per hop, refuses it (the device then answers a request Error bad_relay_state)."""
    device, h = ready_pair()
    h.receive_data(device.send(GenerateRequest("r1", "p", 0.5, 5)))
    h.next_event()
    device.receive_data(frame(4, '{"request_id":"r1"}', blob))
    handoff = device.next_event()
    assert isinstance(handoff, RelayHandoff) and handoff.relay_state == blob and device.state is State.READY
    with pytest.raises(RelayStateError, match=match):
        RelayState.from_bytes(handoff.relay_state)


def test_nan_injected_into_the_raw_bytes_of_a_valid_state() -> None:
    blob = bytearray(relay_state().to_bytes())
    header_end = 8 + int.from_bytes(blob[:8], "little")
    offsets = json.loads(blob[8:header_end])["latents"]["data_offsets"]
    at = header_end + offsets[0] + 4 * 17
    blob[at : at + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(RelayStateError, match="NaN"):
        RelayState.from_bytes(RelayHandoff("r1", bytes(blob)).relay_state)


def test_a_relay_state_over_the_blob_cap_is_refused_from_the_header() -> None:
    """The cap the link still enforces on the bytes it carries (decided from the header, before reading the blob)."""
    body = b'{"request_id":"r1"}'
    data = wire.HEADER.pack(wire.MAGIC, PROTOCOL_VERSION, RelayHandoff.TYPE_CODE, len(body), RelayHandoff.MAX_BLOB + 1) + body
    with pytest.raises(RemoteProtocolError, match=f"blob cap is {RelayHandoff.MAX_BLOB}") as info:
        wire.decode(data, max_message_bytes=1 << 30, max_json_bytes=1 << 16)
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE
    with pytest.raises(LocalProtocolError, match="cap") as local:
        RelayHandoff("r1", bytes(RelayHandoff.MAX_BLOB + 1))
    assert local.value.code is ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"nope", "not a safetensors buffer"),
        (save({"latents": torch.full((1, 4, 2, 2), float("inf"))}), "NaN or Inf"),
        (save({"latents": torch.zeros(4, 2, 2)}), "4-D float tensor"),
        (save({"x": torch.zeros(1, 4, 2, 2)}), r"exactly \['latents'\]"),
    ],
)
def test_a_latent_result_is_carried_as_bytes_and_its_consumer_refuses_a_bad_one(blob: bytes, match: str) -> None:
    device, h = ready_pair()
    h.receive_data(device.send(GenerateRequest("r", "p", 0.5, 5)))
    h.next_event()
    h.receive_data(frame(6, json.dumps({"request_id": "r", "kind": "latent", "timings": {}}), blob))
    result = h.next_event()
    assert isinstance(result, Result) and result.data == blob
    with pytest.raises(RelaydiffError, match=match):
        latents_from_bytes(result.data)


def test_a_png_result_must_start_with_the_png_signature() -> None:
    refuse(ready_pair()[1], frame(6, json.dumps({"request_id": "r", "kind": "png", "timings": {}}), b"GIF89a"), ErrorCode.BAD_BLOB,
           "expected a PNG")


# -- the handshake -----------------------------------------------------------------------------


def test_bad_auth_does_not_quote_either_token() -> None:
    err = refuse(host(), wire.encode(Hello(Role.DEVICE, "wrong-token", CAPS)), ErrorCode.AUTH_FAILED, "auth token does not match")
    assert "wrong-token" not in str(err) and TOKEN not in str(err)


def test_role_conflict() -> None:
    refuse(host(), wire.encode(Hello(Role.HOST, TOKEN)), ErrorCode.ROLE_CONFLICT, "role is 'host'; expected 'device'")


def test_helloack_with_the_wrong_version_or_role() -> None:
    device = Connection(Role.DEVICE, auth_token=TOKEN)
    device.send(device.hello(CAPS))
    refuse(device, wire.encode(HelloAck(Role.DEVICE, "s")), ErrorCode.ROLE_CONFLICT)
    device = Connection(Role.DEVICE, auth_token=TOKEN)
    device.send(device.hello(CAPS))
    refuse(device, wire.encode(HelloAck(Role.HOST, "s", protocol_version=4)), ErrorCode.UNSUPPORTED_VERSION, "is 4; expected 2")


@pytest.mark.parametrize(
    "event",
    [GenerateRequest("r", "p", 0.5, 1), Ping(1, 0.0), Progress("r", 0, 1), HelloAck(Role.DEVICE, "s")],
)
def test_only_hello_close_error_before_the_handshake(event: Event) -> None:
    refuse(host(), wire.encode(event), ErrorCode.UNEXPECTED_EVENT, f"sent {type(event).__name__} in state IDLE")


@pytest.mark.parametrize("event", [Close("bye"), Error("internal", "x")])
def test_close_and_error_are_allowed_before_the_handshake(event: Event) -> None:
    conn = host()
    conn.receive_data(wire.encode(event))
    assert conn.next_event() == event


def test_second_hello_is_refused() -> None:
    device, h = ready_pair()
    refuse(h, wire.encode(Hello(Role.DEVICE, TOKEN, CAPS)), ErrorCode.UNEXPECTED_EVENT, "Hello in state READY")


# -- roles and requests ------------------------------------------------------------------------


def test_direction_rules() -> None:
    device, h = ready_pair()
    refuse(device, wire.encode(GenerateRequest("r", "p", 0.5, 1)), ErrorCode.UNEXPECTED_EVENT, "sent by the device only; the sender is the host")
    device, h = ready_pair()
    refuse(h, wire.encode(RelayHandoff("r", relay_state().to_bytes())), ErrorCode.UNEXPECTED_EVENT, "sent by the host only")


def test_events_for_unknown_or_finished_requests() -> None:
    device, h = ready_pair()
    refuse(device, wire.encode(Progress("ghost", 1, 2)), ErrorCode.UNKNOWN_REQUEST, "'ghost', which is not open")
    device, h = ready_pair()
    h.receive_data(device.send(GenerateRequest("r1", "p", 0.5, 1)))
    h.next_event()
    refuse(h, wire.encode(GenerateRequest("r1", "p", 0.5, 1)), ErrorCode.UNKNOWN_REQUEST, "'r1' in request state OPEN")
    device, h = ready_pair()
    h.receive_data(device.send(GenerateRequest("r1", "p", 0.5, 1)))
    h.next_event()
    refuse(h, wire.encode(Feedback("r1", 1, 1)), ErrorCode.UNEXPECTED_EVENT, "Feedback for request 'r1' in request state OPEN")


def test_open_request_cap() -> None:
    device = Connection(Role.DEVICE, auth_token=TOKEN, config=LinkConfig(max_open_requests=2))
    h = host(LinkConfig(max_open_requests=2))
    h.receive_data(device.send(device.hello(CAPS)))
    h.next_event()
    device.receive_data(h.send(h.hello_ack()))
    device.next_event()
    for rid in ("a", "b"):
        h.receive_data(device.send(GenerateRequest(rid, "p", 0.5, 1)))
        h.next_event()
    with pytest.raises(LocalProtocolError, match="the cap is 2"):
        device.send(GenerateRequest("c", "p", 0.5, 1))
    refuse(h, wire.encode(GenerateRequest("c", "p", 0.5, 1)), ErrorCode.TOO_MANY_REQUESTS, "open request 3; the cap is 2")


# -- local errors --------------------------------------------------------------------------------


def test_local_errors_move_to_error_too() -> None:
    device, h = ready_pair()
    with pytest.raises(LocalProtocolError, match="sent by the device only") as info:
        h.send(GenerateRequest("r", "p", 0.5, 1))
    assert info.value.code is ErrorCode.UNEXPECTED_EVENT and h.state is State.ERROR
    h.send(info.value.to_event())  # an Error may still be sent from ERROR
    h.send(Close())
    assert h.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="in state CLOSED"):
        h.send(Ping(1, 0.0))


def test_sending_before_the_handshake_or_a_foreign_hello() -> None:
    with pytest.raises(LocalProtocolError, match="in state IDLE"):
        host().send(Ping(1, 0.0))
    with pytest.raises(LocalProtocolError, match="this side is the host"):
        host().send(Hello(Role.DEVICE, TOKEN, CAPS))


def test_message_above_the_peer_cap_is_not_sent() -> None:
    device = Connection(Role.DEVICE, auth_token=TOKEN, config=LinkConfig(max_message_bytes=65536))
    h = host()
    h.receive_data(device.send(device.hello(CAPS)))
    h.next_event()
    h.send(h.hello_ack())
    with pytest.raises(LocalProtocolError, match="the peer accepts at most 65536") as info:
        h.send(Ping(1, 0.0, b"x" * 70000))
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: GenerateRequest("r", "p", float("nan"), 1), "quality_preference is nan"),
        (lambda: Ping(-1, 0.0), r"nonce is -1; expected an integer in \[0, 4294967295\]"),
        (lambda: Ping(1, 0.0, "text"), "padding is 'text'; expected bytes"),
        (lambda: Ping(1, 0.0, b"x" * (4 * 1024 * 1024 + 1)), "the cap is 4194304"),
        (lambda: Result("r", "gif", b""), r"kind is 'gif'; expected one of \['png', 'latent'\]"),
        (lambda: Result("r", ResultKind.PNG, b"\x89PNG\r\n\x1a\n", {"t": -1}), "is -1; expected a finite number"),
        (lambda: Hello("device", TOKEN, {"runtimes": ["x"]}), "expected a DeviceCapabilities"),
        (lambda: DeviceCapabilities("coreml", "b", "f" * 64, 1.0), "runtimes is 'coreml'; expected a list"),
        (lambda: Error("busy", "x", request_id=""), "request_id is ''"),
    ],
)
def test_invalid_events_cannot_be_built(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError, match=match):
        build()


def test_connection_arguments() -> None:
    with pytest.raises(ValueError, match="role is 'server'"):
        Connection("server", auth_token=TOKEN)
    with pytest.raises(ValueError, match="auth_token"):
        Connection(Role.HOST, auth_token="")
    with pytest.raises(TypeError, match="bytes"):
        host().receive_data("RDLK")  # type: ignore[arg-type]
    with pytest.raises(RelaydiffError, match="max_message_bytes is 10"):
        LinkConfig(max_message_bytes=10)
    with pytest.raises(RelaydiffError, match="recv_timeout_s"):
        LinkConfig(recv_timeout_s=0)


# -- after an error ---------------------------------------------------------------------------------


def test_after_a_remote_error_only_error_and_close_are_read() -> None:
    conn = host()
    conn.receive_data(b"junk")
    conn.receive_data(wire.encode(Hello(Role.DEVICE, TOKEN, CAPS)))  # queued behind the junk: dropped
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.next_event() is NEED_DATA
    refuse(conn, wire.encode(Ping(1, 0.0)), ErrorCode.UNEXPECTED_EVENT, "in state ERROR")
    conn.receive_data(wire.encode(Close()))
    assert conn.next_event() == Close() and conn.state is State.CLOSED


def test_one_bad_peer_does_not_affect_another() -> None:
    bad = host()
    refuse(bad, b"\x00" * 64, ErrorCode.BAD_HEADER)
    reply = bad.send(RemoteProtocolError(ErrorCode.BAD_HEADER, "x").to_event())
    device, good = ready_pair()
    good.receive_data(device.send(GenerateRequest("r1", "p", 0.5, 1)))
    assert isinstance(good.next_event(), GenerateRequest) and good.state is State.READY
    # the bad peer's device side reads our Error
    peer = Connection(Role.DEVICE, auth_token=TOKEN)
    peer.receive_data(reply)
    assert peer.next_event().code == "bad_header"
