"""Protocol errors: local (we tried to send something invalid) versus remote (the peer did).

Both carry an :class:`ErrorCode`, and both can be turned into an ``Error`` event to send to the
peer before closing. Any protocol error moves a :class:`~relaydiff.link.connection.Connection`
to its ERROR state.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from relaydiff.core.errors import RelaydiffError

if TYPE_CHECKING:
    from relaydiff.link.events import Error


class ErrorCode(str, Enum):
    """The ``code`` of an ``Error`` event. Connection-level codes end the link; request-level ones do not."""

    # connection level: framing and validation (sent before closing)
    BAD_HEADER = "bad_header"  # short, truncated, trailing bytes, bad magic, non-binary frame
    MESSAGE_TOO_LARGE = "message_too_large"  # message, JSON or blob above its cap
    UNSUPPORTED_VERSION = "unsupported_version"  # header or Hello protocol version not spoken here
    UNKNOWN_EVENT = "unknown_event"  # event type code not in the table
    BAD_JSON = "bad_json"  # not UTF-8, not JSON, not an object, duplicate keys, NaN/Infinity
    INVALID_FIELD = "invalid_field"  # missing/unknown key, wrong type, out of range, too long
    BAD_BLOB = "bad_blob"  # blob not allowed for this event, or not what the event says it is
    UNEXPECTED_EVENT = "unexpected_event"  # event not allowed in this state or from this role
    AUTH_FAILED = "auth_failed"  # Hello auth token does not match
    ROLE_CONFLICT = "role_conflict"  # both sides claim the same role
    UNKNOWN_REQUEST = "unknown_request"  # request id not open, or reused
    TOO_MANY_REQUESTS = "too_many_requests"  # more open requests than the cap
    TIMEOUT = "timeout"  # the transport waited longer than the configured timeout
    # request level: carried with a request_id, the link stays up
    BUSY = "busy"  # the host cannot take the request now
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed
    REQUEST_FAILED = "request_failed"  # the generation itself failed
    BAD_RELAY_STATE = "bad_relay_state"  # the device refused the hand-off's relay state (RelayState.from_bytes)
    INTERNAL = "internal"  # a bug on the sending side


class ProtocolError(RelaydiffError):
    """A protocol violation; ``code`` says which kind."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"{self.code.value}: {message}")

    def to_event(self, request_id: str | None = None) -> "Error":
        """An ``Error`` event telling the peer about this error (message cut to the event's cap)."""
        from relaydiff.link.events import MAX_ERROR_MESSAGE_BYTES, Error

        text = self.message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", "ignore")
        return Error(code=self.code.value, message=text, request_id=request_id)


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class PeerError(RelaydiffError):
    """The peer answered with an ``Error`` event where a reply was expected (e.g. it refused our Hello)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"peer reported {code}: {message}")
