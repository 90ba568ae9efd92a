"""Framing: one WebSocket binary message = 16-byte header + UTF-8 JSON object + optional blob.

Header (little-endian), offsets in bytes::

    0  magic        4s   b"RDLK"
    4  version      u16  protocol version (1)
    6  event_type   u16  Event.TYPE_CODE
    8  json_length  u32  bytes of JSON that follow the header
    12 blob_length  u32  bytes of blob that follow the JSON
    16 JSON, then blob; the message is exactly 16 + json_length + blob_length bytes

No pickle, no eval: JSON is parsed with the standard library (NaN/Infinity and duplicate keys
refused) and the blob is only ever handed to the event's own validator.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from relaydiff.link.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from relaydiff.link.events import EVENT_TYPES, PROTOCOL_VERSION, Event

MAGIC = b"RDLK"
HEADER = struct.Struct("<4sHHII")
HEADER_SIZE = HEADER.size  # 16


def encode(event: Event, *, version: int = PROTOCOL_VERSION) -> bytes:
    """Frame ``event`` as one message. Caps are the connection's job; this only serializes."""
    if not isinstance(event, Event) or type(event).TYPE_CODE not in EVENT_TYPES:
        raise TypeError(f"expected a relaydiff.link event, got {type(event).__name__}")
    body = json.dumps(
        event.to_json(), ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")
    blob = event.blob
    return HEADER.pack(MAGIC, version, event.TYPE_CODE, len(body), len(blob)) + body + blob


def peek_type(data: bytes) -> type[Event] | None:
    """The event class a message's header names, without parsing anything else; None when the header is
    not a well-formed version-1 header (of the message's exact length) of a known type (``decode`` then says
    what is wrong)."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, type_code, json_len, blob_len = HEADER.unpack_from(data)
    if magic != MAGIC or version != PROTOCOL_VERSION or HEADER_SIZE + json_len + blob_len != len(data):
        return None
    return EVENT_TYPES.get(type_code)


def decode(data: bytes, *, max_message_bytes: int, max_json_bytes: int) -> Event:
    """Parse and validate one whole message.

    Raises:
        RemoteProtocolError: oversized, short, truncated or padded message, bad magic, unsupported
            version, unknown event type, bad JSON, schema violation, invalid blob.
    """
    n = len(data)
    if n > max_message_bytes:
        raise RemoteProtocolError(ErrorCode.MESSAGE_TOO_LARGE, f"message is {n} bytes; the cap is {max_message_bytes}")
    if n < HEADER_SIZE:
        raise RemoteProtocolError(ErrorCode.BAD_HEADER, f"message is {n} bytes; the header alone is {HEADER_SIZE}")
    magic, version, type_code, json_len, blob_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RemoteProtocolError(ErrorCode.BAD_HEADER, f"magic is {magic!r}; expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"header protocol version is {version}; this side speaks {PROTOCOL_VERSION}"
        )
    cls = EVENT_TYPES.get(type_code)
    if cls is None:
        known = ", ".join(f"{code} ({c.__name__})" for code, c in EVENT_TYPES.items())
        raise RemoteProtocolError(ErrorCode.UNKNOWN_EVENT, f"event type {type_code} is unknown; known: {known}")
    if json_len > max_json_bytes:
        raise RemoteProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE, f"{cls.__name__} JSON is {json_len} bytes; the cap is {max_json_bytes}"
        )
    if blob_len > cls.MAX_BLOB:
        what = "carries no blob" if cls.BLOB_FIELD is None else f"blob cap is {cls.MAX_BLOB} bytes"
        code = ErrorCode.BAD_BLOB if cls.BLOB_FIELD is None else ErrorCode.MESSAGE_TOO_LARGE
        raise RemoteProtocolError(code, f"{cls.__name__} declares a {blob_len}-byte blob; it {what}")
    declared = HEADER_SIZE + json_len + blob_len
    if declared != n:
        state = "truncated" if n < declared else "followed by trailing bytes"
        raise RemoteProtocolError(
            ErrorCode.BAD_HEADER, f"{cls.__name__} message is {state}: header declares {declared} bytes, got {n}"
        )
    obj = _load_object(bytes(data[HEADER_SIZE : HEADER_SIZE + json_len]), cls.__name__)
    extra: dict[str, Any] = {} if cls.BLOB_FIELD is None else {cls.BLOB_FIELD: bytes(data[HEADER_SIZE + json_len :])}
    try:
        return cls.from_json(obj, **extra)
    except LocalProtocolError as exc:  # the peer built an invalid event: same code, blamed on the peer
        raise RemoteProtocolError(exc.code, exc.message) from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = [k for k, _ in pairs]
        raise _DuplicateKey(f"duplicate key {next(k for k in seen if seen.count(k) > 1)!r}")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _load_object(raw: bytes, event: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"{event} JSON is invalid: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"{event} JSON is a {type(obj).__name__}; expected an object")
    return obj
