"""The host-device link: a versioned message protocol for handing relay states over a WebSocket.

``relaydiff.link.connection`` is the protocol core with no I/O (events in, bytes out, one state
table); ``relaydiff.link.transport`` is the thin asyncio/websockets layer (``serve``, ``connect``),
imported separately so the core needs nothing beyond the standard library and relaydiff.core.
The wire format is specified in ``docs/protocol.md``.
"""

from relaydiff.link.config import LinkConfig
from relaydiff.link.connection import NEED_DATA, Connection, RequestState, State
from relaydiff.link.errors import ErrorCode, LocalProtocolError, PeerError, ProtocolError, RemoteProtocolError
from relaydiff.link.events import (
    EVENT_TYPES,
    PROTOCOL_VERSION,
    Close,
    DeviceCapabilities,
    Error,
    Event,
    Feedback,
    GenerateRequest,
    Hello,
    HelloAck,
    Ping,
    Pong,
    Progress,
    RefineHandoff,
    RefineResult,
    RelayHandoff,
    Result,
    ResultKind,
    Role,
)

__all__ = [
    "EVENT_TYPES", "NEED_DATA", "PROTOCOL_VERSION", "Close", "Connection", "DeviceCapabilities", "Error",
    "ErrorCode", "Event", "Feedback", "GenerateRequest", "Hello", "HelloAck", "LinkConfig", "LocalProtocolError",
    "PeerError", "Ping", "Pong", "Progress", "ProtocolError", "RefineHandoff", "RefineResult", "RelayHandoff", "RemoteProtocolError",
    "RequestState", "Result", "ResultKind", "Role", "State",
]
