"""The link's protocol core: a state machine over events, with no I/O (the shape of h11).

    conn = Connection(Role.DEVICE, auth_token=token)
    socket_send(conn.send(conn.hello(capabilities)))   # bytes out
    conn.receive_data(message_from_socket)             # one whole WebSocket message in
    event = conn.next_event()                          # an Event, or NEED_DATA

Every transition of the connection lives in :data:`TRANSITIONS`, and every transition of a
request in :data:`REQUEST_TRANSITIONS`, both below. Any protocol error, local or remote,
moves the connection to ERROR; from there only Error and Close may still travel.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict, deque
from enum import Enum
from typing import Literal

from relaydiff.link import wire
from relaydiff.link.config import LinkConfig
from relaydiff.link.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from relaydiff.link.events import (
    PROTOCOL_VERSION,
    DeviceCapabilities,
    Error,
    Event,
    Hello,
    HelloAck,
    Role,
)


class State(str, Enum):
    """The connection's state."""

    IDLE = "IDLE"  # nothing exchanged yet
    HELLO_SENT = "HELLO_SENT"  # we sent Hello, waiting for HelloAck
    HELLO_RECEIVED = "HELLO_RECEIVED"  # the peer's Hello passed version/auth/role checks; we owe a HelloAck
    READY = "READY"  # handshake done: requests, relays, results, pings
    CLOSED = "CLOSED"  # a Close was sent or received
    ERROR = "ERROR"  # a protocol error happened (either side); only Error and Close may still travel


class Side(str, Enum):
    """Who sends the event: this side or the peer."""

    US = "us"
    PEER = "peer"


class RequestState(str, Enum):
    """Where one request (keyed by request_id) stands."""

    OPEN = "OPEN"  # GenerateRequest seen, host working
    RELAYED = "RELAYED"  # RelayHandoff seen, device working
    REFINING = "REFINING"  # RefineHandoff seen (protocol 2), host refining the device's preview
    DONE = "DONE"  # Result or request Error seen; a late Feedback is still accepted


class NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA  # next_event(): no whole message is waiting; feed receive_data()

# An event's "kind" is its class name, except that an Error with a request_id is "RequestError":
# it ends one request, not the link.
_READY_KINDS = ("GenerateRequest", "RelayHandoff", "Progress", "Result", "Feedback", "Ping", "Pong", "RequestError",
                "RefineHandoff", "RefineResult")
_REQUEST_KINDS = ("GenerateRequest", "RelayHandoff", "Progress", "Result", "Feedback", "RequestError",
                  "RefineHandoff", "RefineResult")
_LIVE = (State.IDLE, State.HELLO_SENT, State.HELLO_RECEIVED, State.READY)

# THE connection state machine: (state, who sends, event kind) -> next state. Anything absent is refused.
TRANSITIONS: dict[tuple[State, Side, str], State] = {
    (State.IDLE, Side.US, "Hello"): State.HELLO_SENT,
    (State.IDLE, Side.PEER, "Hello"): State.HELLO_RECEIVED,
    (State.HELLO_SENT, Side.PEER, "HelloAck"): State.READY,
    (State.HELLO_RECEIVED, Side.US, "HelloAck"): State.READY,
    **{(State.READY, side, kind): State.READY for side in Side for kind in _READY_KINDS},
    **{(state, side, "Error"): State.ERROR for state in (*_LIVE, State.ERROR) for side in Side},
    **{(state, side, "Close"): State.CLOSED for state in (*_LIVE, State.ERROR) for side in Side},
    (State.CLOSED, Side.PEER, "Close"): State.CLOSED,  # the peer's answering Close
}

# Events that only one role may send (all others travel both ways).
ONLY_FROM: dict[str, Role] = {
    "GenerateRequest": Role.DEVICE,
    "RelayHandoff": Role.HOST,
    "Feedback": Role.DEVICE,
    "RefineHandoff": Role.DEVICE,
    "RefineResult": Role.HOST,
}

# THE request state machine: (request state or None if unknown, event kind) -> next state (None: forgotten).
REQUEST_TRANSITIONS: dict[tuple[RequestState | None, str], RequestState | None] = {
    (None, "GenerateRequest"): RequestState.OPEN,
    (RequestState.OPEN, "Progress"): RequestState.OPEN,
    (RequestState.OPEN, "RelayHandoff"): RequestState.RELAYED,
    (RequestState.OPEN, "Result"): RequestState.DONE,  # the host ran every step itself
    (RequestState.OPEN, "RequestError"): RequestState.DONE,
    (RequestState.RELAYED, "Progress"): RequestState.RELAYED,
    (RequestState.RELAYED, "Result"): RequestState.DONE,  # the device reports its image
    (RequestState.RELAYED, "RequestError"): RequestState.DONE,
    (RequestState.RELAYED, "Feedback"): None,  # the device kept the image and reports how it went
    (RequestState.DONE, "RequestError"): RequestState.DONE,  # e.g. a deadline error racing a Result
    (RequestState.DONE, "Feedback"): None,
    # protocol 2, the reverse hand-off: the device's preview latent goes to the host to refine
    (None, "RefineHandoff"): RequestState.REFINING,
    (RequestState.REFINING, "Progress"): RequestState.REFINING,
    (RequestState.REFINING, "RefineResult"): RequestState.DONE,
    (RequestState.REFINING, "RequestError"): RequestState.DONE,
}


def _kind(event: Event) -> str:
    if isinstance(event, Error) and event.request_id is not None:
        return "RequestError"
    return type(event).__name__


def _token_matches(token: bytes, accepted: tuple[bytes, ...]) -> bool:
    """Whether ``token`` is one of ``accepted``; every one is compared (constant time each), none skipped."""
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(token, candidate)
    return found


class Connection:
    """One side of a link, as a state machine that turns events into bytes and bytes into events."""

    def __init__(self, role: Role | str, *, auth_token: str, config: LinkConfig | None = None,
                 peer_tokens: tuple[str, ...] = ()) -> None:
        """
        Args:
            role: this side's role, ``"host"`` or ``"device"``.
            auth_token: the shared secret: sent in our Hello, and required in the peer's Hello.
            config: caps (and, for the transport, timeouts); defaults to ``LinkConfig()``.
            peer_tokens: further tokens a peer's Hello may carry instead of ``auth_token`` (a host with one
                token per client; which one matched is the peer's client identity, read off ``peer_hello``).

        Raises:
            TypeError / ValueError: a bad role, token or config.
        """
        try:
            self.role = Role(role)
        except ValueError:
            raise ValueError(f"role is {role!r}; expected one of {[r.value for r in Role]}") from None
        if not isinstance(auth_token, str) or not auth_token:
            raise ValueError("auth_token must be a non-empty string")
        self.config = config if config is not None else LinkConfig()
        if not isinstance(self.config, LinkConfig):
            raise TypeError(f"config must be a LinkConfig, got {type(self.config).__name__}")
        if isinstance(peer_tokens, str) or not all(isinstance(t, str) and t for t in peer_tokens):
            raise ValueError("peer_tokens must be a tuple of non-empty strings")
        self._auth_token = auth_token
        self._accepted_tokens = tuple(t.encode("utf-8") for t in (auth_token, *peer_tokens))
        self._state = State.IDLE
        self._pending: deque[bytes] = deque()
        self._requests: dict[str, RequestState] = {}  # open requests
        self._finished: OrderedDict[str, RequestState] = OrderedDict()  # DONE requests, oldest first
        self.peer_hello: Hello | HelloAck | None = None  # the peer's half of the handshake
        self.peer_max_message_bytes = self.config.max_message_bytes  # until the peer announces its cap

    # -- public API ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer_role(self) -> Role:
        return self.role.other

    def request_state(self, request_id: str) -> RequestState | None:
        """Where a request stands (None: unknown or forgotten)."""
        return self._requests.get(request_id) or self._finished.get(request_id)

    def hello(self, capabilities: DeviceCapabilities | None = None) -> Hello:
        """Our Hello: role, token, receive cap and version (capabilities are required for a device)."""
        return Hello(self.role, self._auth_token, capabilities, self.config.max_message_bytes, PROTOCOL_VERSION)

    def hello_ack(self, session_id: str | None = None) -> HelloAck:
        """Our HelloAck (a random session id unless one is given)."""
        return HelloAck(self.role, session_id or secrets.token_hex(8), self.config.max_message_bytes, PROTOCOL_VERSION)

    def receive_data(self, data: bytes) -> None:
        """Queue one whole message from the peer (a WebSocket frames messages). Parsed by next_event()."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"receive_data takes bytes, got {type(data).__name__}")
        self._pending.append(bytes(data))

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The next event from the peer, or NEED_DATA.

        Raises:
            RemoteProtocolError: the message is malformed or not allowed now; the connection moves to
                ERROR and the rest of the queued messages are dropped. Reply with ``exc.to_event()``.
        """
        if not self._pending:
            return NEED_DATA
        data = self._pending.popleft()
        try:
            self._precheck(data)
            event = wire.decode(
                data, max_message_bytes=self.config.max_message_bytes, max_json_bytes=self.config.max_json_bytes
            )
            self._transition(Side.PEER, event, len(data))
        except RemoteProtocolError:
            self._state = State.ERROR
            self._pending.clear()
            raise
        return event

    def send(self, event: Event) -> bytes:
        """The bytes of ``event`` as one message, after checking it may be sent now.

        Raises:
            LocalProtocolError: the event is not allowed in this state or from this role, breaks the
                handshake, names an unknown request, or exceeds the peer's cap; the connection moves to ERROR.
        """
        data = wire.encode(event)
        try:
            self._transition(Side.US, event, len(data))
        except LocalProtocolError:
            self._state = State.ERROR
            raise
        return data

    def remote_error(self, code: ErrorCode, message: str) -> RemoteProtocolError:
        """Record a peer error found outside the core (a text frame, a message the socket layer refused
        as oversized): the connection moves to ERROR. Returns the exception for the caller to raise."""
        self._state = State.ERROR
        self._pending.clear()
        return RemoteProtocolError(code, message)

    # -- the machine -----------------------------------------------------------------------

    def _precheck(self, data: bytes) -> None:
        """Refuse from the header alone what no content could make acceptable, before parsing anything:
        a message above ``max_hello_bytes`` before the handshake is done, an event not allowed in this
        state, or one the peer's role never sends (e.g. a RelayHandoff from a device)."""
        if self._state in (State.IDLE, State.HELLO_SENT) and len(data) > self.config.max_hello_bytes:
            raise RemoteProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"message is {len(data)} bytes before the handshake; the cap is {self.config.max_hello_bytes}",
            )
        cls = wire.peek_type(data)
        if cls is None:
            return
        kind = cls.__name__
        kinds = (kind, "RequestError") if kind == "Error" else (kind,)
        if not any((self._state, Side.PEER, k) in TRANSITIONS for k in kinds):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_EVENT, f"the peer sent {kind} in state {self._state.value}")
        only = ONLY_FROM.get(kind)
        if only is not None and self.peer_role is not only:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_EVENT, f"{kind} is sent by the {only.value} only; the sender is the {self.peer_role.value}"
            )

    def _transition(self, side: Side, event: Event, size: int) -> None:
        """Check ``event`` against the tables and the handshake rules, then commit the new states."""
        err: type[ProtocolError] = LocalProtocolError if side is Side.US else RemoteProtocolError
        sender = self.role if side is Side.US else self.peer_role
        kind = _kind(event)
        next_state = TRANSITIONS.get((self._state, side, kind))
        if next_state is None:
            who = "we" if side is Side.US else "the peer"
            raise err(ErrorCode.UNEXPECTED_EVENT, f"{who} sent {kind} in state {self._state.value}")
        only = ONLY_FROM.get(kind)
        if only is not None and sender is not only:
            raise err(ErrorCode.UNEXPECTED_EVENT, f"{kind} is sent by the {only.value} only; the sender is the {sender.value}")
        if side is Side.US and size > self.peer_max_message_bytes:
            raise err(
                ErrorCode.MESSAGE_TOO_LARGE, f"{kind} is {size} bytes; the peer accepts at most {self.peer_max_message_bytes}"
            )
        if isinstance(event, (Hello, HelloAck)):
            self._check_handshake(side, event, err)
        request_update = self._request_update(kind, event, err) if kind in _REQUEST_KINDS else None
        # all checks passed: commit
        self._state = next_state
        if isinstance(event, (Hello, HelloAck)) and side is Side.PEER:
            self.peer_hello = event
            self.peer_max_message_bytes = event.max_message_bytes
        if request_update is not None:
            self._commit_request(*request_update)

    def _check_handshake(self, side: Side, event: Hello | HelloAck, err: type[ProtocolError]) -> None:
        name = type(event).__name__
        if side is Side.US:
            if event.role is not self.role:
                raise err(ErrorCode.INVALID_FIELD, f"{name}.role is {event.role.value!r}; this side is the {self.role.value}")
            if event.protocol_version != PROTOCOL_VERSION:
                raise err(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"{name}.protocol_version is {event.protocol_version}; this side speaks {PROTOCOL_VERSION}",
                )
            return
        if event.protocol_version != PROTOCOL_VERSION:
            raise err(
                ErrorCode.UNSUPPORTED_VERSION,
                f"peer {name} protocol version is {event.protocol_version}; expected {PROTOCOL_VERSION}",
            )
        # the token itself is never quoted: it is a secret, and a near-miss would leak most of it
        if isinstance(event, Hello) and not _token_matches(event.auth_token.encode("utf-8"), self._accepted_tokens):
            raise err(ErrorCode.AUTH_FAILED, "peer Hello auth token does not match this side's token")
        if event.role is self.role:
            raise err(
                ErrorCode.ROLE_CONFLICT,
                f"peer {name} role is {event.role.value!r}; expected {self.peer_role.value!r} (this side is the {self.role.value})",
            )

    def _request_update(
        self, kind: str, event: Event, err: type[ProtocolError]
    ) -> tuple[str, RequestState | None, RequestState | None]:
        request_id: str = getattr(event, "request_id")  # noqa: B009 (Event is a union; not every member declares it)
        current = self.request_state(request_id)
        key = (current, kind)
        if key not in REQUEST_TRANSITIONS:
            if current is None:
                raise err(ErrorCode.UNKNOWN_REQUEST, f"{kind} names request {request_id!r}, which is not open")
            opening = kind in ("GenerateRequest", "RefineHandoff")
            code = ErrorCode.UNKNOWN_REQUEST if opening else ErrorCode.UNEXPECTED_EVENT  # a reused id
            raise err(code, f"{kind} for request {request_id!r} in request state {current.value}")
        new = REQUEST_TRANSITIONS[key]
        if current is None and len(self._requests) >= self.config.max_open_requests:
            cap = self.config.max_open_requests
            raise err(
                ErrorCode.TOO_MANY_REQUESTS, f"request {request_id!r} would be open request {len(self._requests) + 1}; the cap is {cap}"
            )
        return request_id, current, new

    def _commit_request(self, request_id: str, current: RequestState | None, new: RequestState | None) -> None:
        self._requests.pop(request_id, None)
        self._finished.pop(request_id, None)
        if new is RequestState.DONE:
            self._finished[request_id] = new
            while len(self._finished) > self.config.max_finished_requests:
                self._finished.popitem(last=False)
        elif new is not None:
            self._requests[request_id] = new
