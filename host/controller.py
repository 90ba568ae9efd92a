"""The edge controller: serve many devices at once, run the host half of each relay, hand over, make sure it ends.

Per ``GenerateRequest`` (docs/protocol.md, sections 4 and 7):

0. admit it, or answer ``Error(busy)`` (with ``retry_after_s=`` in the message) when this link already has
   ``HostConfig.max_requests_per_session`` requests in progress, or its client (the token its Hello carried:
   see ``client_tokens``) ``max_requests_per_client``, or the host ``max_queue`` -- unless the queue is full
   and the request's client is under its fair share (``max_queue`` / clients with work in progress): then
   the newest *queued* request of the client most over its share is evicted (``Error(busy)``, exactly once;
   ledger source ``evicted``) to make room. Among the links of one client (a token shared by several
   devices) the same rule applies per link. See docs/admission.md;
1. record it in the :class:`~relaydiff.host.ledger.Ledger` (accepted; metadata and digests only);
2. choose the relay step k with the :class:`~relaydiff.host.policy.Policy` (a
   :class:`~relaydiff.host.policy.ContextualPolicy`, such as the bandit, also gets the host's load as
   :class:`~relaydiff.host.policy.Conditions`);
3. run the host steps [0, k) in a worker thread (torch work stays off the event loop), then send
   ``Progress(k, N)``;
4. k = N: send ``Result`` (the final latent; the device decodes it) and record it (source ``host``);
   k < N: send ``RelayHandoff`` and wait for the device's ``Result``, recording it (source ``device``) once its
   PNG decodes within ``max_result_pixels``;
5. exactly once: when the device answers the hand-off with a request ``Error`` (it cannot use the state),
   the host finishes steps [k, N) itself with its copy of the device model (source ``host-fallback``).
   When the device leaves, aborts an open request, or the request's deadline passes, its work is
   cancelled: dropped from the queue, or stopped between two steps (source ``cancelled``), and a device
   still connected gets ``Error(deadline_exceeded)``. A result arriving after that is ignored.

Host steps of concurrent requests are batched: requests that arrive while the worker is busy
wait in a queue, and the next host run takes up to ``HostConfig.max_batch`` of them, in fair order
(round-robin over clients, least recently served first; within a client round-robin over its links;
first come first served within a link: one client's backlog never sits ahead of another's request; a run
headed by a client within its fair share takes no work of a client over it), through one
UNet call per step (:func:`relaydiff.core.relay.start_batch`; each request still stops at its own k, and
is handed over as soon as it does, while the batch goes on with the longer ones).
Cancelled requests are dropped when a run is formed and, within a run (batched or not) or a fallback,
between two steps: a batch goes on without them.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import re
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from ssl import SSLContext
from typing import Any, TypeVar

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.family import LoadedModel
from relaydiff.core.state import RelayState, latents_from_bytes, latents_to_bytes
from relaydiff.core.strength import StrengthPredictors
from relaydiff.host.ledger import Ledger, Source
from relaydiff.host.policy import BudgetPolicy, Conditions, ContextualPolicy, FixedPolicy, PersistentPolicy, Policy
from relaydiff.link.config import LinkConfig
from relaydiff.link.connection import RequestState
from relaydiff.link.errors import ErrorCode, LocalProtocolError, ProtocolError
from relaydiff.link.events import (
    MAX_RESULT_BYTES, Close, Error, Feedback, GenerateRequest, Hello, Ping, Pong, Progress, RefineHandoff, RefineResult, RelayHandoff,
    Result, ResultKind,
)
from relaydiff.link.transport import Link, LinkClosed, LinkServer, serve
from relaydiff.runtime.device import MAX_IMAGE_PIXELS
from relaydiff.runtime.settings import GenerationSettings

PROBE_PADDING = 64 * 1024  # bytes of the second probe Ping: its extra delay over the first measures bandwidth
PROBE_WAIT_S = 1.0  # longest wait for the link probe before a contextual policy chooses without it
LOAD_WINDOW_S = 2.0  # NodeLoad.busy_fraction is measured over about this long
LOAD_RUNS = 8  # NodeLoad.batch_fill and service_s average the last this many host runs
DEFAULT_CLIENT = "default"  # the client identity of a link whose Hello carried the host's own auth_token
_CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostConfig:
    """How the host serves: what it generates, where it listens, how long it waits, how much it takes on."""

    settings: GenerationSettings = field(default_factory=GenerationSettings)  # steps, sampler, guidance, seed
    listen_host: str = "127.0.0.1"  # interface to bind; loopback unless told otherwise
    port: int = 0  # 0 picks a free port (see HostServer.url)
    result_timeout_s: float = 120.0  # longest wait for a device's Result after a hand-off
    result_grace_s: float = 1.0  # extra wait beyond the request's own deadline before the host gives up on it
    workers: int = 1  # threads running torch work (host steps and fallbacks)
    max_batch: int = 8  # most requests whose host steps share one UNet batch; 1 turns batching off
    batch_window_s: float = 0.0  # extra wait for more requests before a host run (0: take what is queued)
    max_queue: int = 64  # requests in progress over all links; a request beyond it gets Error(busy)
    max_requests_per_session: int = 4  # requests in progress on one link; beyond it: Error(busy)
    max_requests_per_client: int | None = None  # requests in progress over all links of one client; None: no cap but max_queue
    busy_retry_after_s: float = 1.0  # the retry-after a busy reply suggests, seconds
    ledger_max_entries: int = 10_000  # completed requests the ledger remembers (metadata and digests only)
    ledger_max_age_s: float = 3600.0  # completed requests older than this are forgotten
    max_result_pixels: int = MAX_IMAGE_PIXELS  # a device PNG above width x height this is refused before decoding
    link: LinkConfig = field(default_factory=LinkConfig)  # caps and timeouts of every link

    def __post_init__(self) -> None:
        for name in ("result_timeout_s", "result_grace_s", "batch_window_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise RelaydiffError(f"HostConfig.{name} must be a number of seconds >= 0, got {value!r}")
        for name in ("busy_retry_after_s", "ledger_max_age_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise RelaydiffError(f"HostConfig.{name} must be a number of seconds > 0, got {value!r}")
        for name in ("workers", "max_batch", "max_queue", "max_requests_per_session", "ledger_max_entries", "max_result_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RelaydiffError(f"HostConfig.{name} must be a positive integer, got {value!r}")
        cap = self.max_requests_per_client
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise RelaydiffError(f"HostConfig.max_requests_per_client must be a positive integer or None, got {cap!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise RelaydiffError(f"HostConfig.port must be in [0, 65535], got {self.port!r}")


@dataclass
class HostStats:
    """What the host did with the requests it was sent (counters, for operators and tests)."""

    accepted: int = 0  # requests admitted (each has one ledger entry)
    busy: int = 0  # requests refused with Error(busy): the queue, the client's or the link's quota was full
    evicted: int = 0  # queued requests given up for a client under its fair share (Error(busy) sent; not in busy)
    cancelled: int = 0  # accepted requests whose work was stopped (device left or aborted, deadline passed)
    deadline_exceeded: int = 0  # Error(deadline_exceeded) sent to a device still connected
    skipped_host_runs: int = 0  # queued host runs dropped before they started (their request was cancelled)
    stopped_between_steps: int = 0  # host or fallback runs stopped between two steps
    refused_results: int = 0  # device Results refused (an unreadable PNG, or one above the pixel cap)
    failed: int = 0  # requests that failed on the host (Error(request_failed) sent)
    ignored_results: int = 0  # Results that arrived when nobody waited (after a cancellation, or unsolicited)
    busy_by_client: dict[str, int] = field(default_factory=dict)  # busy refusals per client identity
    evicted_by_client: dict[str, int] = field(default_factory=dict)  # evictions per client identity (whose work went)


@dataclass(frozen=True)
class NodeLoad:
    """An edge node's load, as it reports it (to a cluster router, and into a contextual policy's conditions)."""

    queue: int = 0  # requests whose host steps are queued or running on this node
    busy_fraction: float = 0.0  # share of the last LOAD_WINDOW_S its worker threads spent on torch work, [0, 1]
    batch_fill: float = 0.0  # mean size of the last host runs / max_batch, [0, 1] (0: no run yet)
    service_s: float = 0.0  # mean wall seconds of the last host runs per request (0: no run yet)

    def to_dict(self) -> dict[str, float]:
        return {"queue": self.queue, "busy_fraction": self.busy_fraction, "batch_fill": self.batch_fill, "service_s": self.service_s}


class _Cancelled(Exception):
    """A request's work stops: its device left or aborted it, or its deadline passed."""

    def __init__(self, reason: str, *, deadline: bool = False) -> None:
        super().__init__(reason)
        self.deadline = deadline


class _Evicted(_Cancelled):
    """A queued request is given up for a client under its fair share; its device is told ``busy``."""


@dataclass
class _Job:
    """One accepted request's cancellation state; the worker thread reads it between steps."""

    request_id: str
    deadline: float  # time.monotonic() by which the device wants its image
    client: str = DEFAULT_CLIENT  # the client identity of its link (fair share, fair queueing)
    link: str = ""  # its link's session id
    reason: str | None = None  # set once: why the work stops
    stopped_between_steps: bool = False
    released: bool = False  # its place in the queue and quotas is given back (once)

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        """Raise _Cancelled when the work should stop (called on the loop and, between steps, in the worker)."""
        if self.reason is not None:
            raise _Cancelled(self.reason)
        if time.monotonic() > self.deadline:
            raise _Cancelled(f"the deadline of request {self.request_id!r} passed", deadline=True)

    def on_step(self, *_: Any) -> None:
        """A relaydiff.core.relay step callback: stop the run between two steps when cancelled."""
        try:
            self.check()
        except _Cancelled:
            self.stopped_between_steps = True
            raise


@dataclass
class _Session:
    """One device link: its requests in progress, those waiting for a Result, and whether the link is gone."""

    id: str
    link: Link
    client: str = DEFAULT_CLIENT  # whose token the link's Hello carried (fair share is per client, then per link)
    jobs: dict[str, _Job] = field(default_factory=dict)  # requests in progress, by request id
    finished: OrderedDict[str, tuple[str, GenerateRequest, int]] = field(default_factory=OrderedDict)  # id -> (ledger key, request, k), for Feedback
    waiting: dict[str, asyncio.Future[Result]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False
    probe_sent: float = 0.0  # monotonic time the link probe (two Pings) left
    probe_pongs: dict[int, float] = field(default_factory=dict)  # probe nonce -> monotonic arrival of its Pong
    network: asyncio.Future[tuple[float, float]] | None = None  # (rtt_s, bandwidth_mbit_s) once both Pongs are back

    def key(self, request_id: str) -> str:
        return f"{self.id}/{request_id}"


class _NoResult(Exception):
    """The device's Result will not come (link gone, request aborted, or time out)."""

    def __init__(self, reason: str, *, device_error: bool = False) -> None:
        super().__init__(reason)
        self.device_error = device_error  # the device answered with a request Error (it cannot use the state)


class HostServer:
    """Serves devices over the link; each accepted request ends with exactly one ledger result."""

    def __init__(
        self,
        host_model: LoadedModel,
        fallback_model: LoadedModel,
        *,
        auth_token: str,
        policy: Policy | None = None,
        config: HostConfig | None = None,
        ssl: SSLContext | None = None,
        client_tokens: Mapping[str, str] | None = None,
        refine_predictors: StrengthPredictors | None = None,
    ) -> None:
        """
        Args:
            host_model: the large model that runs steps [0, k).
            fallback_model: the model that finishes steps [k, N) when a device cannot (the device variant,
                so the image is the one the device would have made; the host model works too).
            auth_token: the token every device's Hello must carry.
            policy: chooses k; default :class:`FixedPolicy` (k from the request's quality preference). A
                :class:`ContextualPolicy` (e.g. :class:`~relaydiff.host.bandit.BanditPolicy`) also gets the
                host queue and utilisation and the link's measured RTT and bandwidth; a
                :class:`PersistentPolicy` is saved by this server in a worker thread.
            config: see :class:`HostConfig`.
            ssl: a server-side SSLContext to serve ``wss://``; None serves ``ws://``.
            client_tokens: client name -> token: further tokens a device's Hello may carry; the name is
                that link's client identity (quotas and fair share are per client). A link with
                ``auth_token`` is client ``"default"``. Devices sharing one token are one client: the host
                cannot tell them apart beyond their links.
            refine_predictors: the strength predictors (``relaydiff preview train``) that choose the refine
                strength of a ``RefineHandoff`` sent without one; its disagreement probe runs
                ``fallback_model`` (the device variant). None: such a hand-off is refused.
        """
        self.host_model = host_model
        self.refine_predictors = refine_predictors
        self.fallback_model = fallback_model
        self.policy: Policy = policy if policy is not None else FixedPolicy()
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must implement choose() and observe(), got {type(self.policy).__name__}")
        if isinstance(self.policy, PersistentPolicy):
            self.policy.autosave = False  # this server saves the state itself, in a worker thread
        self.config = config if config is not None else HostConfig()
        if not isinstance(self.config, HostConfig):
            raise TypeError(f"config must be a HostConfig, got {type(self.config).__name__}")
        self.ledger = Ledger(max_entries=self.config.ledger_max_entries, max_age_s=self.config.ledger_max_age_s)
        self.stats = HostStats()
        self._auth_token = auth_token
        self._client_tokens = _check_client_tokens(client_tokens or {}, auth_token)
        self._ssl = ssl
        self._client_jobs: Counter[str] = Counter()  # requests in progress per client
        self._links: dict[str, _Session] = {}  # open links, by session id
        self._served = itertools.count()  # fair queueing: a tick per request put in a host run
        self._last_served: dict[str, int] = {}  # client or "client/link" -> tick it was last served
        self._sessions = itertools.count(1)
        self._reuses = itertools.count(2)  # suffix of the ledger key of a request id a link uses again
        self._server: LinkServer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight = 0  # requests accepted and not yet finished (the host queue the policy sees)
        self._busy = 0  # worker threads running torch work now
        self._pending: list[tuple[Any, _Job, asyncio.Future[tuple[RelayState, float, int]]]] = []  # host runs waiting for a batch
        self._batching = False  # a _drain task is running
        self._drain_task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # requests per host run, in order (batching statistics; the last 10,000)
        self.host_busy_s = 0.0  # wall seconds spent in host runs (host steps of every batch), for capacity figures
        self._flush_task: asyncio.Task[None] | None = None  # saving a PersistentPolicy's state in a worker thread
        self._running = 0  # requests in the host run now (NodeLoad.queue counts them with the queued ones)
        self._run_seconds: list[float] = []  # wall seconds per request of the last LOAD_RUNS host runs
        self._busy_integral = 0.0  # worker-thread seconds of torch work so far (NodeLoad.busy_fraction)
        self._busy_mark = time.monotonic()  # when _busy_integral was last brought up to date
        self._load_samples: list[tuple[float, float]] = []  # (monotonic time, _busy_integral) over the load window

    @property
    def ignored_results(self) -> int:
        """Results that arrived when nobody waited (after a cancellation or fallback, or unsolicited)."""
        return self.stats.ignored_results

    def conditions(self, network: tuple[float, float] | None = None) -> Conditions:
        """The serving conditions a contextual policy sees for a request arriving now (``network``: rtt_s, Mbit/s)."""
        rtt, bandwidth = network if network is not None else (None, None)
        return Conditions(host_queue=max(self._in_flight - 1, 0), host_utilisation=min(self._busy / self.config.workers, 1.0),
                          rtt_s=rtt, bandwidth_mbit_s=bandwidth)

    def _account_busy(self) -> None:
        now = time.monotonic()
        self._busy_integral += self._busy * (now - self._busy_mark)
        self._busy_mark = now

    def node_load(self) -> NodeLoad:
        """This node's load now: host steps queued or running, busy share over the last LOAD_WINDOW_S, batch fill."""
        self._account_busy()
        now = self._busy_mark
        self._load_samples.append((now, self._busy_integral))
        while len(self._load_samples) > 2 and now - self._load_samples[1][0] >= LOAD_WINDOW_S:
            self._load_samples.pop(0)
        t0, b0 = self._load_samples[0]
        busy = (self._busy_integral - b0) / ((now - t0) * self.config.workers) if now - t0 > 1e-3 else min(self._busy / self.config.workers, 1.0)
        sizes = self.batch_sizes[-LOAD_RUNS:]
        fill = sum(sizes) / (len(sizes) * self.config.max_batch) if sizes else 0.0
        service = sum(self._run_seconds) / len(self._run_seconds) if self._run_seconds else 0.0
        return NodeLoad(queue=len(self._pending) + self._running, busy_fraction=min(max(busy, 0.0), 1.0),
                        batch_fill=min(fill, 1.0), service_s=service)

    @classmethod
    def from_family(
        cls,
        family_dir: str | Path | None = None,
        *,
        auth_token: str,
        host_variant: str | None = None,
        device_variant: str | None = None,
        policy: Policy | None = None,
        config: HostConfig | None = None,
        ssl: SSLContext | None = None,
        client_tokens: Mapping[str, str] | None = None,
        refine_predictors: StrengthPredictors | str | Path | None = "default",
    ) -> "HostServer":
        """Load the host variant and (for fallbacks) the device variant of a family folder.

        ``refine_predictors``: "default" loads the family's own ``preview/predictors.json`` when it has one
        (:func:`relaydiff.core.strength.default_predictors_path`), a path loads that file, None runs none.

        Raises:
            FamilyNotFoundError / CompatibilityError / RelaydiffError: missing folder or variant, a plain pipeline
                folder (one UNet: no family.json naming a host and a device), or a pair that cannot relay.
        """
        from relaydiff.core import family

        root = family.require_family(family_dir, needed="a host UNet and a device UNet (the host finishes a relay "
                                     "itself when a device cannot)") if family_dir is not None else family.default_family_dir()
        host_ref = family.resolve(root, host_variant, role="host")
        device_ref = family.resolve(root, device_variant, role="device")
        family.check_pair(host_ref, device_ref)
        host = family.load(host_ref)
        device = family.load(device_ref, share_with=host)
        from relaydiff.core.strength import load_predictors

        predictors = load_predictors(root, refine_predictors)
        return cls(host, device, auth_token=auth_token, policy=policy, config=config, ssl=ssl, client_tokens=client_tokens,
                   refine_predictors=predictors)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RelaydiffError("the host server is not started")
        return self._server.url

    def start_workers(self) -> None:
        """Start the worker threads only (a cluster replica runs host steps without listening for links)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="relaydiff-host")

    async def start(self) -> str:
        """Start listening; returns the URL devices connect to."""
        if self._server is not None:
            raise RelaydiffError("the host server is already started")
        self.start_workers()
        self._server = await serve(
            self._serve_link, self.config.listen_host, self.config.port, auth_token=self._auth_token,
            config=self.config.link, ssl=self._ssl, peer_tokens=tuple(t.decode("utf-8") for _, t in self._client_tokens),
        )
        log.info("host listening on %s (policy %s)", self._server.url, type(self.policy).__name__)
        return self._server.url

    async def close(self) -> None:
        """Stop accepting, close every link, and wait until every accepted request has its result."""
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._flush_task is not None:
            await self._flush_task
        if isinstance(self.policy, PersistentPolicy) and self.policy.dirty:
            await asyncio.to_thread(self.policy.flush)

    async def __aenter__(self) -> "HostServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- one link ----------------------------------------------------------------------------

    async def _serve_link(self, link: Link) -> None:
        session = _Session(f"s{next(self._sessions)}", link, self._client_of(link))
        self._links[session.id] = session
        log.info("link %s open from %s (client %s)", session.id, _peer(link), session.client)
        try:
            await self._link_loop(session)
        except Exception as exc:  # a bug here must not leave the link half-alive: tell the device and close
            log.exception("link %s failed", session.id)
            await link.fail(LocalProtocolError(ErrorCode.INTERNAL, f"host error: {type(exc).__name__}"))
        finally:
            session.closed = True
            for job in session.jobs.values():
                job.cancel("the device left")
            self._drop_cancelled()  # its queued host runs go now, not when the queue next forms a run
            for request_id in list(session.waiting):
                self._abort(session, request_id, "the link closed")
            while session.tasks:  # every request this device started ends (cancelled work ends at its next step)
                await asyncio.gather(*list(session.tasks), return_exceptions=True)
            self._links.pop(session.id, None)
            self._last_served.pop(f"{session.client}/{session.id}", None)
            log.info("link %s closed", session.id)

    async def _link_loop(self, session: _Session) -> None:
        link = session.link
        hello = link.peer_hello
        capabilities = hello.capabilities if isinstance(hello, Hello) else None
        if isinstance(self.policy, ContextualPolicy):  # measure the link for the policy: RTT and bandwidth
            session.network = asyncio.get_running_loop().create_future()
            session.probe_sent = time.monotonic()
            await self._send(session, Ping(1, session.probe_sent))
            await self._send(session, Ping(2, session.probe_sent, b"\0" * PROBE_PADDING))
        while not session.closed:
            try:
                event = await link.recv()
            except TimeoutError:
                continue  # an idle device; keepalives notice a dead socket
            except (LinkClosed, ProtocolError) as exc:
                if isinstance(exc, ProtocolError):
                    log.warning("link %s: the device broke the protocol: %s", session.id, exc)
                return  # the peer went away or broke the protocol (recv told it and closed the socket)
            if isinstance(event, GenerateRequest):
                await self._admit(session, event, capabilities)
            elif isinstance(event, RefineHandoff):  # protocol 2: refine a device preview (docs/protocol.md 4.12)
                task = asyncio.create_task(self._refine(session, event))
                session.tasks.add(task)
                task.add_done_callback(session.tasks.discard)
            elif isinstance(event, Result):
                future = session.waiting.pop(event.request_id, None)
                if future is not None and not future.done():
                    future.set_result(event)
                else:
                    self.stats.ignored_results += 1
            elif isinstance(event, Feedback):
                self._feedback(session, event)
            elif isinstance(event, Error) and event.request_id is not None:
                log.info("link %s: the device aborted request %r: %s", session.id, event.request_id, event.code)
                job = session.jobs.get(event.request_id)
                if job is not None and event.request_id not in session.waiting:  # still OPEN: stop the host's work
                    job.cancel(f"the device aborted it: {event.code}")
                    self._drop_cancelled()
                self._abort(session, event.request_id, f"device aborted: {event.code}: {event.message}", device_error=True)
            elif isinstance(event, Ping):
                await self._send(session, event.pong())
            elif isinstance(event, Pong):
                self._probe_pong(session, event)
            elif isinstance(event, (Close, Error)):
                return

    async def _admit(self, session: _Session, request: GenerateRequest, capabilities: Any) -> None:
        """Start serving ``request``, or answer Error(busy) when this link, its client or the host has too many in
        progress; a full client quota or queue first evicts queued work of whoever is most over its fair share."""
        cfg = self.config
        client_cap = cfg.max_requests_per_client
        why: str | None = None
        if len(session.jobs) >= cfg.max_requests_per_session:
            why = f"this link has {len(session.jobs)} requests in progress; the cap is {cfg.max_requests_per_session}"
        elif client_cap is not None and self._client_jobs[session.client] >= client_cap:
            if not self._evict_for(session, across_clients=False):
                why = f"this client has {self._client_jobs[session.client]} requests in progress; the cap is {client_cap}"
        elif self._in_flight >= cfg.max_queue:
            if not self._evict_for(session, across_clients=True):
                why = f"the host has {self._in_flight} requests in progress; the cap is {cfg.max_queue}"
        if why is None:
            job = _Job(request.request_id, time.monotonic() + request.deadline_s, session.client, session.id)
            session.jobs[request.request_id] = job
            self._in_flight += 1
            self._client_jobs[session.client] += 1
            self.stats.accepted += 1
            task = asyncio.create_task(self._serve_request(session, request, capabilities, job))
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)
            return
        self.stats.busy += 1
        self.stats.busy_by_client[session.client] = self.stats.busy_by_client.get(session.client, 0) + 1
        log.info("link %s: request %r refused busy: %s", session.id, request.request_id, why)
        await self._send(session, Error(ErrorCode.BUSY.value, f"retry_after_s={cfg.busy_retry_after_s:g}; {why}", request.request_id))

    def _client_of(self, link: Link) -> str:
        """The client identity of a link: the name of the token its Hello carried (DEFAULT_CLIENT: auth_token)."""
        hello = link.peer_hello
        token = hello.auth_token.encode("utf-8") if isinstance(hello, Hello) else b""
        found = DEFAULT_CLIENT
        for name, candidate in self._client_tokens:  # every token compared, in constant time each
            if hmac.compare_digest(token, candidate):
                found = name
        return found

    def _release(self, job: _Job) -> None:
        """Give a request's place in the queue and in its client's and link's quotas back (once)."""
        if job.released:
            return
        job.released = True
        self._in_flight -= 1
        self._client_jobs[job.client] -= 1
        if self._client_jobs[job.client] <= 0:
            del self._client_jobs[job.client]
        session = self._links.get(job.link)
        if session is not None and session.jobs.get(job.request_id) is job:
            del session.jobs[job.request_id]

    def _evict_for(self, session: _Session, *, across_clients: bool) -> bool:
        """Make room for a request of ``session`` by evicting the newest queued request of whoever is most over
        its fair share, if the requester is under its own; True when one was evicted (its device gets busy).

        ``across_clients``: the host queue is full: shares are ``max_queue`` / clients with work in progress
        (the requester's included); when the requester's client is not under its share, or the client's own
        quota is full (``across_clients`` False), the links of that client share its work in progress the same way.
        """
        if across_clients:
            clients = set(self._client_jobs) | {session.client}
            share = self.config.max_queue / len(clients)
            if self._client_jobs[session.client] + 1 <= share:
                over = sorted(((n, c) for c, n in self._client_jobs.items() if c != session.client and n > share), reverse=True)
                for _, client in over:
                    found = self._newest_queued(client=client)
                    if found is not None:
                        return self._evict(found, session)
        links = [x for x in self._links.values() if x.client == session.client and (x.jobs or x is session)]
        share = self._client_jobs[session.client] / max(len(links), 1)
        if len(session.jobs) + 1 > share:
            return False
        over_links = sorted(((len(x.jobs), x.id) for x in links if x is not session and len(x.jobs) > share), reverse=True)
        for _, link_id in over_links:
            found = self._newest_queued(link=link_id)
            if found is not None:
                return self._evict(found, session)
        return False

    def _newest_queued(self, *, client: str | None = None, link: str | None = None) -> int | None:
        """Index in the host queue of the newest queued (not yet running) request of ``client`` (or of the link
        ``link``) that is not being cancelled, or None."""
        for i in range(len(self._pending) - 1, -1, -1):
            job = self._pending[i][1]
            if job.reason is None and (job.client == client if link is None else job.link == link):
                return i
        return None

    def _evict(self, index: int | None, session: _Session) -> bool:
        if index is None:
            return False
        _, job, future = self._pending.pop(index)
        why = (f"evicted from the full host queue for client {session.client!r} (link {session.id}), under its fair "
               f"share, while client {job.client!r} (link {job.link}) is over its share")
        job.cancel(why)
        self._release(job)  # now: the request being admitted takes its place at once
        self.stats.evicted += 1
        self.stats.evicted_by_client[job.client] = self.stats.evicted_by_client.get(job.client, 0) + 1
        if not future.done():
            future.set_exception(_Evicted(why))
        return True

    @staticmethod
    def _probe_pong(session: _Session, pong: Pong) -> None:
        """Record a probe Pong; with both back, RTT = first Pong's delay, bandwidth = padding / extra delay."""
        if session.network is None or session.network.done() or pong.nonce not in (1, 2) or pong.timestamp != session.probe_sent:
            return
        session.probe_pongs[pong.nonce] = time.monotonic()
        if len(session.probe_pongs) == 2:
            rtt = session.probe_pongs[1] - session.probe_sent
            extra = max(session.probe_pongs[2] - session.probe_pongs[1], 1e-6)
            bandwidth = min(max(PROBE_PADDING * 8 / extra / 1e6, 0.01), 10_000.0)
            session.network.set_result((rtt, bandwidth))

    async def _network(self, session: _Session) -> tuple[float, float] | None:
        """The session's probe result, waiting at most PROBE_WAIT_S for it; None when it does not come."""
        if session.network is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(session.network), PROBE_WAIT_S)
        except TimeoutError:
            return None

    def _abort(self, session: _Session, request_id: str, why: str, *, device_error: bool = False) -> None:
        future = session.waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(_NoResult(why, device_error=device_error))

    def _feedback(self, session: _Session, feedback: Feedback) -> None:
        finished = session.finished.pop(feedback.request_id, None)
        if finished is None:
            return  # a request this host cancelled or refused, or one forgotten
        key, request, k = finished
        entry = self.ledger.find(key)
        if entry is not None:
            entry.feedback = feedback
        self.policy.observe(request, k, feedback)
        if isinstance(self.policy, PersistentPolicy) and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self._flush_policy())

    async def _flush_policy(self) -> None:
        """Save the policy's state in a worker thread until nothing is left unsaved (the loop never writes files)."""
        assert isinstance(self.policy, PersistentPolicy)
        try:
            while self.policy.dirty:
                await asyncio.to_thread(self.policy.flush)
        except Exception:  # the policy keeps its unsaved state; the next Feedback tries again
            log.exception("saving the policy state failed")

    async def _send(self, session: _Session, event: Any) -> bool:
        """Send if the link is alive; False when it is not (the caller stops or falls back).

        An event the link core refuses is a bug on this side: the device is told (Error internal) and the
        link closed, never left silently in ERROR.
        """
        if session.closed:
            return False
        try:
            await session.link.send(event)
        except LocalProtocolError as exc:
            log.error("link %s: the host tried to send an invalid %s: %s", session.id, type(event).__name__, exc)
            session.closed = True
            await session.link.fail(LocalProtocolError(ErrorCode.INTERNAL, f"host error: {exc.code.value}"))
            return False
        except (LinkClosed, TimeoutError, ProtocolError):
            return False
        return True

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RelaydiffError("the host server is not started")
        self._account_busy()
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._account_busy()
            self._busy -= 1

    async def _refine(self, session: _Session, handoff: RefineHandoff) -> None:
        """Answer a reverse hand-off: check it against the host model, refine in a worker, send the PNG."""
        from relaydiff.core.state import latents_from_bytes

        why: str | None
        try:  # the host consumes the preview latent: it parses and checks it here, once (the link carries bytes)
            latent: Any = latents_from_bytes(handoff.latent)
        except RelaydiffError as exc:
            latent, why = None, f"refine latent refused: {exc}"
        else:
            why = _refine_mismatch(self.host_model, handoff, latent, self.refine_predictors is not None)
        if why is None:
            try:
                png, strength, evals, seconds = await self._work(_refine_png, self.host_model, handoff, latent,
                                                                 self.refine_predictors, self.fallback_model)
            except RelaydiffError as exc:
                why = str(exc)
            else:
                await self._send(session, RefineResult(handoff.request_id, strength, evals, png, {"host_s": round(seconds, 6)}))
                return
        await self._send(session, Error(ErrorCode.REQUEST_FAILED.value, why[:1000], request_id=handoff.request_id))

    # -- one request -------------------------------------------------------------------------

    async def _serve_request(self, session: _Session, request: GenerateRequest, capabilities: Any, job: _Job) -> None:
        base = session.key(request.request_id)
        key = base if base not in self.ledger else f"{base}#{next(self._reuses)}"  # an id reused after its Feedback
        entry = None
        try:
            entry = self.ledger.accept(key, request.prompt)
            steps = self.config.settings.steps
            if isinstance(self.policy, ContextualPolicy):
                k = int(self.policy.choose_in(request, capabilities, steps, self.conditions(await self._network(session))))
            else:
                k = int(self.policy.choose(request, capabilities, steps))
            relay_request = self.config.settings.request(request.prompt, k)  # checks k in [0, N]
            if isinstance(self.policy, BudgetPolicy):  # the device's cache budget travels in the relay state
                relay_request = replace(relay_request, cache_budget=self.policy.device_budget(request, k, steps))
            entry.relay_step, entry.steps = k, steps
            state, host_s, batch = await self._host_run(relay_request, job)
            timings = {"host_s": host_s, "host_batch": float(batch)}
            job.check()  # the device may have aborted or left while the host steps ran
            await self._send(session, Progress(request.request_id, k, steps))  # tells the device N, also for k = N
            if k == steps:
                job.check()  # not while a Progress was written: the device may have aborted meanwhile
                self.ledger.complete(key, Source.HOST, latents=state.latents, timings=timings)
                self._finished(session, key, request, k)
                await self._send(session, Result(request.request_id, ResultKind.LATENT, latents_to_bytes(state.latents),
                                                  {"host_s": host_s}))
                return
            try:
                result = await self._await_device(session, request, state, job)
            except _NoResult as no:
                if not no.device_error or session.closed:
                    job.check()
                    raise _Cancelled(str(no)) from None
                job.check()  # the device cannot use the state: the host finishes its copy, if the deadline allows
                latents, fallback_s = await self._fallback_run(state, job)
                self.ledger.complete(key, Source.HOST_FALLBACK, latents=latents, timings={**timings, "fallback_s": fallback_s})
                self._finished(session, key, request, k)
                return
            await self._accept_result(session, key, request, k, result, timings)
        except _Evicted as stop:  # answered busy, like a refusal, but after it was accepted: recorded once
            if entry is not None:
                self.ledger.complete(key, Source.EVICTED, error=str(stop))
            log.info("link %s: request %r evicted: %s", session.id, request.request_id, stop)
            if session.link.connection.request_state(request.request_id) is not RequestState.DONE:
                retry = f"retry_after_s={self.config.busy_retry_after_s:g}; {stop}"[:1000]
                await self._send(session, Error(ErrorCode.BUSY.value, retry, request.request_id))
        except _Cancelled as stop:
            self.stats.cancelled += 1
            self.stats.stopped_between_steps += job.stopped_between_steps
            if entry is not None:
                self.ledger.complete(key, Source.CANCELLED, error=str(stop))
            log.info("link %s: request %r cancelled: %s", session.id, request.request_id, stop)
            if stop.deadline and session.link.connection.request_state(request.request_id) is not RequestState.DONE:
                self.stats.deadline_exceeded += 1
                await self._send(session, Error(ErrorCode.DEADLINE_EXCEEDED.value, str(stop)[:1000], request.request_id))
        except Exception as exc:  # one request's failure must not end the link or leave the ledger open
            self.stats.failed += 1
            log.exception("link %s: request %r failed", session.id, request.request_id)
            if entry is not None:
                self.ledger.complete(key, Source.FAILED, error=f"{type(exc).__name__}: {exc}")
            if session.link.connection.request_state(request.request_id) is not RequestState.DONE:
                message = f"request failed: {type(exc).__name__}: {exc}"[:1000]
                await self._send(session, Error(ErrorCode.REQUEST_FAILED.value, message, request.request_id))
        finally:
            self._release(job)

    def _finished(self, session: _Session, key: str, request: GenerateRequest, k: int) -> None:
        """Remember a finished request for its Feedback (as many as the link core remembers DONE ids)."""
        session.finished[request.request_id] = (key, request, k)
        session.finished.move_to_end(request.request_id)
        while len(session.finished) > self.config.link.max_finished_requests:
            session.finished.popitem(last=False)

    async def _accept_result(self, session: _Session, key: str, request: GenerateRequest, k: int, result: Result,
                             timings: dict[str, float]) -> None:
        """Record the device's Result once its PNG decodes within the pixel cap (decoded in a worker thread)."""
        from relaydiff.runtime.device import decode_png

        self._finished(session, key, request, k)  # before the decode: the device's Feedback may follow at once
        try:
            if result.kind is ResultKind.PNG:
                pixels = await asyncio.to_thread(decode_png, result.data, max_pixels=self.config.max_result_pixels)
            else:  # the link carried bytes: this is the one parse of the device's latent
                latents = latents_from_bytes(result.data, max_bytes=MAX_RESULT_BYTES)
        except RelaydiffError as exc:
            session.finished.pop(request.request_id, None)
            self.stats.refused_results += 1
            log.warning("link %s: result of request %r refused: %s", session.id, request.request_id, exc)
            self.ledger.complete(key, Source.FAILED, error=f"the device's result was refused: {exc}", device_timings=result.timings)
            await self._send(session, Error(ErrorCode.REQUEST_FAILED.value, f"result refused: {exc}"[:1000], request.request_id))
            return
        if result.kind is ResultKind.PNG:
            size = (int(pixels.shape[1]), int(pixels.shape[0]))
            self.ledger.complete(key, Source.DEVICE, png=result.data, image_size=size, timings=timings, device_timings=result.timings)
        else:
            self.ledger.complete(key, Source.DEVICE, latents=latents, timings=timings, device_timings=result.timings)

    async def _fallback_run(self, state: RelayState, job: _Job) -> tuple[Any, float]:
        """Finish steps [k, N) of ``state`` with the fallback model; returns (final latents, seconds)."""
        return await self._work(_device_steps, self.fallback_model, state, job)

    async def _host_run(self, request: Any, job: _Job) -> tuple[RelayState, float, int]:
        """Queue ``request``'s host steps; returns (state, seconds of its host run, requests in that run)."""
        future: asyncio.Future[tuple[RelayState, float, int]] = asyncio.get_running_loop().create_future()
        self._pending.append((request, job, future))
        if not self._batching:
            self._batching = True
            self._drain_task = asyncio.create_task(self._drain())  # held: the loop keeps only weak references
        return await future

    async def _drain(self) -> None:
        """Run queued host steps, up to ``max_batch`` compatible requests per run, until the queue is empty."""
        try:
            while self._pending:
                if self.config.batch_window_s > 0:
                    await asyncio.sleep(self.config.batch_window_s)
                self._drop_cancelled()
                if not self._pending:
                    break
                group = self._next_group()
                first = group[0][0]
                for p in group:
                    self._pending.remove(p)
                    tick = next(self._served)
                    self._last_served[p[1].client] = tick
                    self._last_served[f"{p[1].client}/{p[1].link}"] = tick
                self.batch_sizes.append(len(group))
                del self.batch_sizes[:-10_000]
                t_run = time.perf_counter()
                self._running = len(group)
                try:
                    if len(group) == 1:  # the unbatched path: bit-identical to relaydiff.core.relay.start
                        results: list[Any] = [await self._work(_host_steps, self.host_model, first, group[0][1])]
                    else:
                        ready = _hand_out(asyncio.get_running_loop(), [p[2] for p in group])
                        results = await self._work(_host_batch, self.host_model, [p[0] for p in group],
                                                   [p[1] for p in group], ready)
                except Exception as exc:  # every request of the run fails (or stops) on its own, and is answered
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self._running = 0
                    self.host_busy_s += time.perf_counter() - t_run
                    self._run_seconds.append((time.perf_counter() - t_run) / len(group))
                    del self._run_seconds[:-LOAD_RUNS]
                for (_, _, future), outcome in zip(group, results):
                    if future.done():
                        continue
                    if isinstance(outcome, Exception):  # dropped from the batch between two steps (cancelled)
                        future.set_exception(outcome)
                    else:
                        future.set_result((outcome[0], outcome[1], len(group)))
        except Exception as exc:  # a bug in the queue itself: fail what waits, so that every request is answered
            log.exception("the host queue failed")
            for _, _, future in self._pending:
                if not future.done():
                    future.set_exception(exc)
            self._pending.clear()
        finally:
            self._batching = False

    def _next_group(self) -> list[tuple[Any, _Job, asyncio.Future[tuple[RelayState, float, int]]]]:
        """The next host run: up to ``max_batch`` compatible queued requests in fair order. A run headed by a
        client within its fair share takes no work of a client over its share (``max_queue`` / clients with work
        in progress): a backlog never makes another client's request wait for a bigger batch."""
        order = self._fair_order()
        head = order[0]
        group = [p for p in order if (p[0].steps, p[0].sampler) == (head[0].steps, head[0].sampler)]
        share = self.config.max_queue / max(len(self._client_jobs), 1)
        over = {c for c, n in self._client_jobs.items() if n > share}
        if head[1].client not in over:
            group = [p for p in group if p[1].client not in over]
        return group[: self.config.max_batch]

    def _fair_order(self) -> list[tuple[Any, _Job, asyncio.Future[tuple[RelayState, float, int]]]]:
        """The host queue in the order host runs take it: round-robin over clients (least recently served
        first), within a client round-robin over its links (likewise), first come first served within a link."""
        by_client: dict[str, dict[str, list[Any]]] = {}
        for p in self._pending:
            by_client.setdefault(p[1].client, {}).setdefault(p[1].link, []).append(p)
        queues = []
        for client in sorted(by_client, key=lambda c: self._last_served.get(c, -1)):  # stable: arrival order breaks ties
            links = by_client[client]
            served = {lk: self._last_served.get(f"{client}/{lk}", -1) for lk in links}
            queues.append(_interleave([links[lk] for lk in sorted(links, key=served.__getitem__)]))
        return _interleave(queues)

    def _drop_cancelled(self) -> None:
        """Drop queued host runs whose request was cancelled (device left or aborted, deadline passed)."""
        keep = []
        for request, job, future in self._pending:
            try:
                job.check()
            except _Cancelled as stop:
                self.stats.skipped_host_runs += 1
                if not future.done():
                    future.set_exception(stop)
                continue
            keep.append((request, job, future))
        self._pending[:] = keep

    async def _await_device(self, session: _Session, request: GenerateRequest, state: RelayState, job: _Job) -> Result:
        """Hand the state over and wait for the device's Result.

        Raises:
            _NoResult: it will not come (link gone, the device answered with an Error, or the wait timed out).
        """
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        job.check()  # the device may have aborted while the Progress was written (no await between this and the send)
        session.waiting[request.request_id] = future  # registered before sending: a fast Result finds it
        if session.closed or not await self._send(session, RelayHandoff(request.request_id, state.to_bytes())):
            session.waiting.pop(request.request_id, None)
            raise _NoResult("the hand-off could not be sent")
        remaining = job.deadline - time.monotonic()
        wait = min(self.config.result_timeout_s, max(remaining, 0.0) + self.config.result_grace_s)
        try:
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            session.waiting.pop(request.request_id, None)
            raise _Cancelled(f"no result for request {request.request_id!r} within {wait:.3g} s of the hand-off",
                             deadline=True) from None


def _interleave(queues: list[list[T]]) -> list[T]:
    """Round-robin: the first item of each queue, then the second of each, and so on."""
    out: list[T] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _check_client_tokens(client_tokens: Mapping[str, str], auth_token: str) -> tuple[tuple[str, bytes], ...]:
    """(name, token bytes) of each client token; names are ids, tokens non-empty, distinct, and not auth_token."""
    if not isinstance(client_tokens, Mapping):
        raise TypeError(f"client_tokens must map client names to tokens, got {type(client_tokens).__name__}")
    seen = {auth_token}
    out = []
    for name, token in client_tokens.items():
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name) or name == DEFAULT_CLIENT:
            raise RelaydiffError(f"client name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - and not {DEFAULT_CLIENT!r}")
        if not isinstance(token, str) or not token or len(token.encode("utf-8")) > 256:
            raise RelaydiffError(f"the token of client {name!r} must be a non-empty string of at most 256 bytes")
        if token in seen:  # the token itself is never quoted
            raise RelaydiffError(f"the token of client {name!r} is also another client's (or the host's own) token")
        seen.add(token)
        out.append((name, token.encode("utf-8")))
    return tuple(out)


def _peer(link: Link) -> str:
    """The peer's address for logs ("host:port"), or "?"."""
    address = getattr(link.websocket, "remote_address", None)
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else "?"


def _host_steps(model: LoadedModel, request: Any, job: _Job) -> tuple[RelayState, float]:
    from relaydiff.core.relay import start

    t0 = time.perf_counter()
    state = start(model, request, on_step=job.on_step)
    return state, time.perf_counter() - t0


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _hand_out(loop: asyncio.AbstractEventLoop, futures: list[Any]) -> Callable[[int, RelayState, float], None]:
    """A start_batch on_ready (called in the worker thread) that resolves request j's future on the loop at once."""
    def ready(j: int, state: RelayState, seconds: float) -> None:
        loop.call_soon_threadsafe(_resolve, futures[j], (state, seconds, len(futures)))
    return ready


def _host_batch(model: LoadedModel, requests: list[Any], jobs: list[_Job],
                on_ready: Callable[[int, RelayState, float], None]) -> list[tuple[RelayState, float] | Exception]:
    from relaydiff.core.relay import start_batch

    return start_batch(model, requests, on_step=[job.on_step for job in jobs], on_ready=on_ready)


def _device_steps(model: LoadedModel, state: RelayState, job: _Job) -> tuple[Any, float]:
    """The host's fallback: finish its own copy of the state with the device model. The host consumes the state
    here, so it validates it here (once) and runs the compatibility check every consumer runs (in ``resume``)."""
    from relaydiff.core.relay import resume
    from relaydiff.core.state import validate

    t0 = time.perf_counter()
    validate(state)
    latents = resume(model, state, on_step=job.on_step).latents
    return latents, time.perf_counter() - t0


def _refine_mismatch(model: LoadedModel, handoff: RefineHandoff, latent: Any, predicts: bool = False) -> str | None:
    """Why ``model`` cannot refine ``handoff`` (family, latent spec, sampler, strength), or None."""
    from relaydiff.core.denoiser import latent_spec_of
    from relaydiff.core.schedulers import SAMPLERS

    if handoff.family_id != model.family_id:
        return f"refine family_id is {handoff.family_id!r}; this host's is {model.family_id!r}"
    spec = latent_spec_of(model)
    shape = tuple(latent.shape)
    want = (1, spec.channels, *spec.sample_size)
    if shape != want:
        return f"refine latent has shape {shape}; this host's latent spec is {want}"
    if handoff.sampler not in SAMPLERS:
        return f"refine sampler is {handoff.sampler!r}; expected one of {sorted(SAMPLERS)}"
    if handoff.strength is None and not predicts:
        return "refine strength is absent and this host has no strength predictor; send a strength in (0, 1]"
    return None


def _refine_png(model: LoadedModel, handoff: RefineHandoff, latent: Any, predictors: StrengthPredictors | None = None,
                probe_model: LoadedModel | None = None) -> tuple[bytes, float, int, float]:
    """Refine the hand-off's latent with the host model (relaydiff.core.refine); (PNG, strength, UNet evals, seconds).

    A hand-off without a strength gets the predictors' (their probe: one host and one ``probe_model`` UNet
    call on the preview; the host-UNet call is counted in the evals, as :class:`relaydiff.preview.session.LocalRefiner` does).
    """
    import io

    from PIL import Image

    from relaydiff.core.refine import refine
    from relaydiff.core.relay import decode, encode_prompt, relay_side

    t0 = time.perf_counter()
    strength, probe = handoff.strength, 0
    if strength is None:
        from relaydiff.core.strength import refine_features

        if predictors is None or probe_model is None:
            raise RelaydiffError("refine strength is absent and this host has no strength predictor; send a strength in (0, 1]")
        features = refine_features(model, probe_model, latent.float(), handoff.prompt, steps=handoff.steps, seed=handoff.seed)
        strength, probe = predictors.refine_strength(features), 1
        log.info("refine %s: predicted strength %.3f from %s", handoff.request_id, strength, features)
    cond, uncond = encode_prompt(model, handoff.prompt)
    cfg = handoff.guidance_scale > 1.0
    out = refine(relay_side(model), latent.float(), (cond, uncond if cfg else None), strength=strength,
                 steps=handoff.steps, sampler=handoff.sampler, guidance_scale=handoff.guidance_scale, seed=handoff.seed)
    buf = io.BytesIO()
    Image.fromarray(decode(model, out.latents)[0]).save(buf, format="PNG")
    return buf.getvalue(), strength, out.plan.calls * (2 if cfg else 1) + probe, time.perf_counter() - t0
