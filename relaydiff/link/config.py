"""Caps and timeouts of a link: the core enforces the caps, the transport the timeouts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.events import DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_CAP, MIN_MESSAGE_CAP


@dataclass(frozen=True)
class LinkConfig:
    """One side's link settings. Caps are announced to the peer in Hello/HelloAck (max_message_bytes)."""

    # -- caps (enforced by Connection) --
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest message we accept (header + JSON + blob); also websockets' max_size
    max_json_bytes: int = 64 * 1024  # largest JSON part of a message we accept
    max_hello_bytes: int = 8 * 1024  # largest message we accept before the handshake is done (Hello, HelloAck, Error)
    max_open_requests: int = 16  # requests opened by GenerateRequest and not yet finished
    max_finished_requests: int = 256  # finished request ids remembered so a late Feedback is accepted
    # -- timeouts in seconds (enforced by relaydiff.link.transport) --
    open_timeout_s: float = 10.0  # TCP + TLS + WebSocket upgrade
    handshake_timeout_s: float = 10.0  # from the socket opening to Hello/HelloAck done
    recv_timeout_s: float = 60.0  # default wait for one message in Link.recv (a relay can take a while)
    send_timeout_s: float = 30.0  # one message written to the socket (16 MiB at ~4 Mbit/s)
    close_timeout_s: float = 2.0  # waiting for the peer's Close and the WebSocket closing handshake
    keepalive_interval_s: float | None = 20.0  # WebSocket-level ping period; None disables it
    keepalive_timeout_s: float | None = 20.0  # drop the socket if a keepalive ping is not answered in time
    # -- failed-login limit (enforced by relaydiff.link.transport.serve, per remote address) --
    max_failed_logins: int = 5  # failed handshakes an address may have within failed_login_window_s
    failed_login_window_s: float = 60.0  # beyond the limit, the address is refused (unread) for this long
    # -- transport options --
    compression: bool = False  # permessage-deflate; off: relay states are float noise and compress poorly

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_json_bytes", "max_hello_bytes", "max_open_requests", "max_finished_requests",
                     "max_failed_logins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RelaydiffError(f"LinkConfig.{name} must be a positive integer, got {value!r}")
        if not MIN_MESSAGE_CAP <= self.max_message_bytes <= MAX_MESSAGE_CAP:
            raise RelaydiffError(
                f"LinkConfig.max_message_bytes is {self.max_message_bytes}; expected [{MIN_MESSAGE_CAP}, {MAX_MESSAGE_CAP}]"
            )
        if self.max_json_bytes > self.max_message_bytes:
            raise RelaydiffError(
                f"LinkConfig.max_json_bytes {self.max_json_bytes} exceeds max_message_bytes {self.max_message_bytes}"
            )
        if not 1024 <= self.max_hello_bytes <= self.max_message_bytes:
            raise RelaydiffError(
                f"LinkConfig.max_hello_bytes is {self.max_hello_bytes}; expected [1024, max_message_bytes {self.max_message_bytes}]"
            )
        for name in ("failed_login_window_s", "open_timeout_s", "handshake_timeout_s", "recv_timeout_s", "send_timeout_s", "close_timeout_s",
                     "keepalive_interval_s", "keepalive_timeout_s"):
            value = getattr(self, name)
            if value is None and name.startswith("keepalive"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise RelaydiffError(f"LinkConfig.{name} must be a positive number of seconds, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (for logs and saved run configs)."""
        return asdict(self)
