"""A thin asyncio layer: a :class:`~relaydiff.link.connection.Connection` over a WebSocket (``websockets``).

All protocol rules live in the I/O-free core; this module moves whole messages, applies the
timeouts of :class:`~relaydiff.link.config.LinkConfig`, performs the Hello handshake, and on
a protocol error tells the peer (an ``Error`` event) before closing the socket.

    async def handler(link: Link) -> None:
        event = await link.recv()
        ...

    server = await serve(handler, auth_token=token)          # host side, 127.0.0.1, a free port
    link = await connect(server.url, auth_token=token, capabilities=caps)   # device side
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any

from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.connection import Connection as WebSocket
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.config import LinkConfig
from relaydiff.link.connection import NEED_DATA, Connection, State
from relaydiff.link.errors import ErrorCode, LocalProtocolError, PeerError, ProtocolError, RemoteProtocolError
from relaydiff.link.events import Close, DeviceCapabilities, Error, Event, Hello, HelloAck, Role

_CLOSE_CODES = {ErrorCode.AUTH_FAILED: 1008, ErrorCode.MESSAGE_TOO_LARGE: 1009}  # WebSocket close codes; else 1002
MAX_TRACKED_ADDRESSES = 10_000  # addresses the failed-login limiter remembers (the least recent are forgotten)
log = logging.getLogger(__name__)


class LinkClosed(RelaydiffError):
    """The socket closed under us (the peer went away without a Close event, or after one)."""


class Link:
    """One open link: send and receive events over a WebSocket, with the core checking every one."""

    def __init__(self, websocket: WebSocket, connection: Connection) -> None:
        self.websocket = websocket
        self.connection = connection
        self.config = connection.config

    @property
    def state(self) -> State:
        return self.connection.state

    @property
    def peer_hello(self) -> Hello | HelloAck | None:
        """The peer's Hello (on the accepting side) or HelloAck (on the connecting side)."""
        return self.connection.peer_hello

    async def send(self, event: Event) -> None:
        """Send one event.

        Raises:
            LocalProtocolError: the core refuses the event (the link is then in ERROR).
            TimeoutError: the write took longer than ``config.send_timeout_s``.
            LinkClosed: the socket is closed.
        """
        data = self.connection.send(event)
        try:
            await asyncio.wait_for(self.websocket.send(data), self.config.send_timeout_s)
        except ConnectionClosed as exc:
            raise LinkClosed(f"cannot send {type(event).__name__}: the socket is closed ({exc})") from None

    async def recv(self, timeout: float | None = None) -> Event:
        """The next event from the peer, waiting at most ``timeout`` (default ``config.recv_timeout_s``) seconds.

        Raises:
            RemoteProtocolError: the peer broke the protocol; an Error was sent to it and the socket closed.
            TimeoutError: no message arrived in time (the link stays open).
            LinkClosed: the socket closed.
        """
        timeout = self.config.recv_timeout_s if timeout is None else timeout
        while True:
            try:
                event = self.connection.next_event()
            except RemoteProtocolError as exc:
                await self.fail(exc)
                raise
            if isinstance(event, Close):
                await self.websocket.close()  # the peer is done: no answer is owed but closing the socket
            if event is not NEED_DATA:
                return event
            try:
                message = await asyncio.wait_for(self.websocket.recv(), timeout)
            except ConnectionClosed as exc:
                if exc.sent is not None and exc.sent.code == 1009:  # websockets enforced max_size for us
                    cap = self.websocket.protocol.max_message_size
                    raise self.connection.remote_error(
                        ErrorCode.MESSAGE_TOO_LARGE, f"message exceeds the cap of {cap} bytes"
                    ) from None
                raise LinkClosed(f"the socket closed ({exc})") from None
            if isinstance(message, str):
                error = self.connection.remote_error(
                    ErrorCode.BAD_HEADER, "received a text frame; the link uses binary frames only"
                )
                await self.fail(error)
                raise error
            self.connection.receive_data(message)

    async def fail(self, error: ProtocolError) -> None:
        """Tell the peer about ``error`` (an Error event, best effort) and close the socket."""
        try:
            await self.send(error.to_event())
        except (LocalProtocolError, LinkClosed, TimeoutError):
            pass  # the peer is gone or the core is closed: closing the socket below is all that is left
        await self.websocket.close(code=_CLOSE_CODES.get(error.code, 1002), reason=error.code.value)

    async def close(self, reason: str = "") -> None:
        """Send Close (if the link is still live), wait briefly for the peer's Close, and close the socket."""
        if self.state is not State.CLOSED:
            try:
                await self.send(Close(reason))
                if self.state is State.CLOSED:
                    await self._await_peer_close()
            except (LocalProtocolError, LinkClosed, TimeoutError):
                pass  # the peer is already gone: nothing to wait for
        await self.websocket.close()

    async def _await_peer_close(self) -> None:
        try:
            async with asyncio.timeout(self.config.close_timeout_s):
                while True:
                    message = await self.websocket.recv()
                    if isinstance(message, bytes):
                        self.connection.receive_data(message)
                        if isinstance(self.connection.next_event(), Close):
                            return
        except (ConnectionClosed, RemoteProtocolError):
            return  # the socket closed or the peer sent something else after our Close: either way, done

    async def __aenter__(self) -> "Link":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


class LinkServer:
    """A running link server; ``url`` is what a client connects to."""

    def __init__(self, server: Server, *, secure: bool) -> None:
        self.server = server
        self.host, self.port = server.sockets[0].getsockname()[:2]
        self.url = f"{'wss' if secure else 'ws'}://{self.host}:{self.port}/"

    async def close(self) -> None:
        """Stop accepting, close every open link, and wait for the handlers to finish."""
        self.server.close()
        await self.server.wait_closed()

    async def __aenter__(self) -> "LinkServer":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


class LoginLimiter:
    """Failed handshakes per remote address in a sliding window; an address over the limit is locked out.

    Hand-written: a dozen lines over a dict of deques, bounded in addresses and in failures per address.
    """

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def locked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        now = time.monotonic()
        times = self._recent(address, now)
        return times[0] + self.window_s - now if len(times) >= self.max_failures else 0.0

    def failed(self, address: str) -> None:
        now = time.monotonic()
        times = self._recent(address, now)
        times.append(now)
        while len(times) > self.max_failures:
            times.popleft()
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)


def _address(websocket: Any) -> str:
    """The remote IP address (no port: a guesser changes ports), or "?"."""
    remote = getattr(websocket, "remote_address", None)
    return str(remote[0]) if isinstance(remote, tuple) and remote else "?"


def _ws_options(config: LinkConfig) -> dict[str, Any]:
    return {
        "max_size": config.max_message_bytes,  # websockets refuses (1009) anything above the protocol cap
        "max_queue": 4,  # at most 4 received messages buffered ahead of recv(): 4 x max_size of memory
        "compression": "deflate" if config.compression else None,
        "open_timeout": config.open_timeout_s,
        "close_timeout": config.close_timeout_s,
        "ping_interval": config.keepalive_interval_s,
        "ping_timeout": config.keepalive_timeout_s,
    }


async def serve(
    handler: Callable[[Link], Awaitable[None]],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    auth_token: str,
    role: Role | str = Role.HOST,
    config: LinkConfig | None = None,
    ssl: SSLContext | None = None,
    peer_tokens: tuple[str, ...] = (),
) -> LinkServer:
    """Serve links: each connecting peer must complete the Hello handshake, then ``handler(link)`` runs.

    A peer that fails the handshake (bad version, token or role, malformed message, timeout) gets an
    Error event and is disconnected; other peers are unaffected. The link is closed when the handler returns.

    Args:
        handler: called once per accepted link.
        host: interface to bind (default loopback only); port: 0 picks a free port (see ``LinkServer.port``).
        auth_token: the token every peer's Hello must carry.
        role: this side's role (the host, usually).
        config: caps and timeouts; ``LinkConfig()`` by default.
        ssl: a server-side SSLContext for wss://; None serves plain ws://.
        peer_tokens: further tokens a peer's Hello may carry instead of ``auth_token`` (one per client; the
            handler tells which from ``link.peer_hello.auth_token``).
    """
    config = config if config is not None else LinkConfig()
    Connection(role, auth_token=auth_token, config=config, peer_tokens=peer_tokens)  # check the arguments now, not per peer

    limiter = LoginLimiter(config.max_failed_logins, config.failed_login_window_s)

    async def on_socket(websocket: ServerConnection) -> None:
        link = Link(websocket, Connection(role, auth_token=auth_token, config=config, peer_tokens=peer_tokens))
        address = _address(websocket)
        locked = limiter.locked_for(address)
        if locked > 0:  # too many failed logins from there: refused before reading anything
            log.warning("link refused peer=%s code=auth_failed reason=locked_out retry_in_s=%.0f", address, locked)
            await link.fail(RemoteProtocolError(
                ErrorCode.AUTH_FAILED, f"too many failed logins from this address; retry in {locked:.0f} s"))
            return
        try:
            hello = await link.recv(timeout=config.handshake_timeout_s)
        except RemoteProtocolError as exc:  # recv already told the peer and closed the socket
            limiter.failed(address)
            log.warning("link refused peer=%s code=%s", address, exc.code.value)
            return
        except TimeoutError:
            limiter.failed(address)
            log.warning("link refused peer=%s code=timeout", address)
            await link.fail(RemoteProtocolError(ErrorCode.TIMEOUT, f"no Hello within {config.handshake_timeout_s} s"))
            return
        except LinkClosed:
            return
        if not isinstance(hello, Hello):  # a Close or Error instead of a Hello: the peer gave up
            await websocket.close()
            return
        log.info("link accepted peer=%s role=%s", address, hello.role.value)
        try:
            await link.send(link.connection.hello_ack(secrets.token_hex(8)))
            websocket.protocol.max_message_size = config.max_message_bytes  # authenticated: the full cap from now on
            await handler(link)
        finally:
            await link.close()

    # until a peer's Hello passes, websockets itself refuses any message above max_hello_bytes (unread, unparsed)
    options = {**_ws_options(config), "max_size": config.max_hello_bytes}
    server = await ws_serve(on_socket, host, port, ssl=ssl, **options)
    return LinkServer(server, secure=ssl is not None)


async def connect(
    url: str,
    *,
    auth_token: str,
    role: Role | str = Role.DEVICE,
    capabilities: DeviceCapabilities | None = None,
    config: LinkConfig | None = None,
    ssl: SSLContext | None = None,
) -> Link:
    """Open a link to ``url`` and complete the handshake (send Hello, await HelloAck).

    Raises:
        PeerError: the peer refused the Hello (e.g. ``auth_failed``, ``unsupported_version``).
        RemoteProtocolError: the peer answered with something malformed.
        TimeoutError: no answer within ``config.handshake_timeout_s``.
        LinkClosed: the peer closed the socket without answering.
    """
    config = config if config is not None else LinkConfig()
    connection = Connection(role, auth_token=auth_token, config=config)
    hello = connection.hello(capabilities)  # validates capabilities before opening a socket
    tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl}  # without one, websockets uses the system's trust for wss://
    websocket = await ws_connect(url, proxy=None, **tls, **_ws_options(config))  # a direct edge link: no proxy
    link = Link(websocket, connection)
    try:
        await link.send(hello)
        answer = await link.recv(timeout=config.handshake_timeout_s)
        if isinstance(answer, Error):
            raise PeerError(answer.code, answer.message)
        if not isinstance(answer, HelloAck):
            raise LinkClosed(f"the peer answered the Hello with {type(answer).__name__}")
    except BaseException:
        await websocket.close()
        raise
    return link
