"""The edge controller: serve many devices at once, run the host half of each relay, hand over, make sure it ends.

Per ``GenerateRequest`` (docs/protocol.md, sections 4 and 7):

1. record it in the :class:`~relaydiff.host.ledger.Ledger` (accepted);
2. choose the relay step k with the :class:`~relaydiff.host.policy.Policy` (a
   :class:`~relaydiff.host.policy.ContextualPolicy`, such as the bandit, also gets the host's load as
   :class:`~relaydiff.host.policy.Conditions`);
3. run the host steps [0, k) in a worker thread (torch work stays off the event loop), then send
   ``Progress(k, N)``;
4. k = N: send ``Result`` (the final latent; the device decodes it) and record it (source ``host``);
   k < N: send ``RelayHandoff`` and wait for the device's ``Result``, recording it (source ``device``);
5. exactly once: when the hand-off cannot be sent, the link drops, or no ``Result`` arrives in time,
   the host finishes steps [k, N) itself with its copy of the device model and records that
   (source ``host-fallback``). A result arriving after that is ignored, never recorded twice.

Host steps of concurrent requests are batched: requests that arrive while the worker is busy
wait in a queue, and the next host run takes up to ``HostConfig.max_batch`` of them through one
UNet call per step (:func:`relaydiff.core.relay.start_batch`; each request still stops at its own k).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.family import LoadedModel
from relaydiff.core.state import RelayState
from relaydiff.host.ledger import Ledger, Source
from relaydiff.host.policy import Conditions, ContextualPolicy, FixedPolicy, Policy
from relaydiff.link.config import LinkConfig
from relaydiff.link.errors import ErrorCode, ProtocolError
from relaydiff.link.events import Close, Error, Feedback, GenerateRequest, Hello, Ping, Pong, Progress, RelayHandoff, Result

from relaydiff.link.transport import Link, LinkClosed, LinkServer, serve
from relaydiff.runtime.settings import GenerationSettings

PROBE_PADDING = 64 * 1024  # bytes of the second probe Ping: its extra delay over the first measures bandwidth
PROBE_WAIT_S = 1.0  # longest wait for the link probe before a contextual policy chooses without it

T = TypeVar("T")


@dataclass(frozen=True)
class HostConfig:
    """How the host serves: what it generates, where it listens, how long it waits."""

    settings: GenerationSettings = field(default_factory=GenerationSettings)  # steps, sampler, guidance, seed
    listen_host: str = "127.0.0.1"  # interface to bind; loopback unless told otherwise
    port: int = 0  # 0 picks a free port (see HostServer.url)
    result_timeout_s: float = 120.0  # longest wait for a device's Result after a hand-off
    result_grace_s: float = 1.0  # extra wait beyond the request's own deadline before the host finishes it
    workers: int = 1  # threads running torch work (host steps and fallbacks)
    max_batch: int = 8  # most requests whose host steps share one UNet batch; 1 turns batching off
    batch_window_s: float = 0.0  # extra wait for more requests before a host run (0: take what is queued)
    link: LinkConfig = field(default_factory=LinkConfig)  # caps and timeouts of every link

    def __post_init__(self) -> None:
        for name in ("result_timeout_s", "result_grace_s", "batch_window_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise RelaydiffError(f"HostConfig.{name} must be a number of seconds >= 0, got {value!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise RelaydiffError(f"HostConfig.workers must be a positive integer, got {self.workers!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise RelaydiffError(f"HostConfig.max_batch must be a positive integer, got {self.max_batch!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise RelaydiffError(f"HostConfig.port must be in [0, 65535], got {self.port!r}")


@dataclass
class _Session:
    """One device link: its requests waiting for a Result, and whether the link is gone."""

    id: str
    link: Link
    requests: dict[str, GenerateRequest] = field(default_factory=dict)  # by request id
    relay_steps: dict[str, int] = field(default_factory=dict)
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
    ) -> None:
        """
        Args:
            host_model: the large model that runs steps [0, k).
            fallback_model: the model that finishes steps [k, N) when a device does not (the device variant,
                so the image is the one the device would have made; the host model works too).
            auth_token: the token every device's Hello must carry.
            policy: chooses k; default :class:`FixedPolicy` (k from the request's quality preference). A
                :class:`ContextualPolicy` (e.g. :class:`~relaydiff.host.bandit.BanditPolicy`) also gets the
                host queue and utilisation; network and device load are not measured by the host yet.
            config: see :class:`HostConfig`.
        """
        self.host_model = host_model
        self.fallback_model = fallback_model
        self.policy: Policy = policy if policy is not None else FixedPolicy()
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must implement choose() and observe(), got {type(self.policy).__name__}")
        self.config = config if config is not None else HostConfig()
        if not isinstance(self.config, HostConfig):
            raise TypeError(f"config must be a HostConfig, got {type(self.config).__name__}")
        self.ledger = Ledger()
        self.ignored_results = 0  # Results that arrived when nobody waited (after a fallback, or unsolicited)
        self._auth_token = auth_token
        self._sessions = itertools.count(1)
        self._server: LinkServer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight = 0  # requests accepted and not yet finished (the host queue the policy sees)
        self._busy = 0  # worker threads running torch work now
        self._pending: list[tuple[Any, asyncio.Future[tuple[RelayState, float, int]]]] = []  # host runs waiting for a batch
        self._batching = False  # a _drain task is running
        self._drain_task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # requests per host run, in order (batching statistics)
        self.host_busy_s = 0.0  # wall seconds spent in host runs (host steps of every batch), for capacity figures

    def conditions(self, network: tuple[float, float] | None = None) -> Conditions:
        """The serving conditions a contextual policy sees for a request arriving now (``network``: rtt_s, Mbit/s)."""
        rtt, bandwidth = network if network is not None else (None, None)
        return Conditions(host_queue=max(self._in_flight - 1, 0), host_utilisation=min(self._busy / self.config.workers, 1.0),
                          rtt_s=rtt, bandwidth_mbit_s=bandwidth)

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
    ) -> "HostServer":
        """Load the host variant and (for fallbacks) the device variant of a family folder.

        Raises:
            FamilyNotFoundError / CompatibilityError / RelaydiffError: missing folder or variant, or a pair that cannot relay.
        """
        from relaydiff.core import family

        root = family_dir if family_dir is not None else family.default_family_dir()
        host_ref = family.resolve(root, host_variant, role="host")
        device_ref = family.resolve(root, device_variant, role="device")
        family.check_pair(host_ref, device_ref)
        host = family.load(host_ref)
        device = family.load(device_ref, share_with=host)
        return cls(host, device, auth_token=auth_token, policy=policy, config=config)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RelaydiffError("the host server is not started")
        return self._server.url

    async def start(self) -> str:
        """Start listening; returns the URL devices connect to."""
        if self._server is not None:
            raise RelaydiffError("the host server is already started")
        self._executor = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="relaydiff-host")
        self._server = await serve(
            self._serve_link, self.config.listen_host, self.config.port, auth_token=self._auth_token, config=self.config.link,
        )
        return self._server.url

    async def close(self) -> None:
        """Stop accepting, close every link, and wait until every accepted request has its result."""
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> "HostServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- one link ----------------------------------------------------------------------------

    async def _serve_link(self, link: Link) -> None:
        hello = link.peer_hello
        session = _Session(f"s{next(self._sessions)}", link)
        capabilities = hello.capabilities if isinstance(hello, Hello) else None
        if isinstance(self.policy, ContextualPolicy):  # measure the link for the policy: RTT and bandwidth
            session.network = asyncio.get_running_loop().create_future()
            session.probe_sent = time.monotonic()
            await self._send(session, Ping(1, session.probe_sent))
            await self._send(session, Ping(2, session.probe_sent, b"\0" * PROBE_PADDING))
        try:
            while True:
                try:
                    event = await link.recv()
                except TimeoutError:
                    continue  # an idle device; keepalives notice a dead socket
                except (LinkClosed, ProtocolError):
                    break  # the peer went away or broke the protocol (recv told it and closed the socket)
                if isinstance(event, GenerateRequest):
                    task = asyncio.create_task(self._serve_request(session, event, capabilities))
                    session.tasks.add(task)
                    task.add_done_callback(session.tasks.discard)
                elif isinstance(event, Result):
                    future = session.waiting.pop(event.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(event)
                    else:
                        self.ignored_results += 1
                elif isinstance(event, Feedback):
                    self._feedback(session, event)
                elif isinstance(event, Error) and event.request_id is not None:
                    self._abort(session, event.request_id, f"device aborted: {event.code}: {event.message}")
                elif isinstance(event, Ping):
                    await self._send(session, event.pong())
                elif isinstance(event, Pong):
                    self._probe_pong(session, event)
                elif isinstance(event, (Close, Error)):
                    break
        finally:
            session.closed = True
            for request_id in list(session.waiting):
                self._abort(session, request_id, "the link closed")
            while session.tasks:  # finish (or fall back on) every request this device started
                await asyncio.gather(*list(session.tasks), return_exceptions=True)

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

    def _abort(self, session: _Session, request_id: str, why: str) -> None:
        future = session.waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(_NoResult(why))

    def _feedback(self, session: _Session, feedback: Feedback) -> None:
        key = session.key(feedback.request_id)
        request = session.requests.get(feedback.request_id)
        if request is None:
            return
        self.ledger.get(key).feedback = feedback
        self.policy.observe(request, session.relay_steps[feedback.request_id], feedback)

    async def _send(self, session: _Session, event: Any) -> bool:
        """Send if the link is alive; False when it is not (the caller falls back)."""
        if session.closed:
            return False
        try:
            await session.link.send(event)
        except (LinkClosed, TimeoutError, ProtocolError):
            return False
        return True

    async def _work(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RelaydiffError("the host server is not started")
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._busy -= 1

    # -- one request -------------------------------------------------------------------------

    async def _serve_request(self, session: _Session, request: GenerateRequest, capabilities: Any) -> None:
        key = session.key(request.request_id)
        t0 = time.monotonic()
        entry = self.ledger.accept(key, request.prompt)
        session.requests[request.request_id] = request
        self._in_flight += 1
        try:
            steps = self.config.settings.steps
            if isinstance(self.policy, ContextualPolicy):
                k = int(self.policy.choose_in(request, capabilities, steps, self.conditions(await self._network(session))))
            else:
                k = int(self.policy.choose(request, capabilities, steps))
            relay_request = self.config.settings.request(request.prompt, k)  # checks k in [0, N]
            entry.relay_step, entry.steps = k, steps
            session.relay_steps[request.request_id] = k
            state, host_s, batch = await self._host_run(relay_request)
            await self._send(session, Progress(request.request_id, k, steps))  # tells the device N, also for k = N
            if k == steps:
                self.ledger.complete(key, Source.HOST, latents=state.latents, timings={"host_s": host_s, "host_batch": batch})
                await self._send(session, Result.from_latents(request.request_id, state.latents, {"host_s": host_s}))
                return
            result = await self._await_device(session, request, state, t0)
            if result is not None:
                self.ledger.complete(key, Source.DEVICE, png=result.data, timings={"host_s": host_s, "host_batch": batch, **result.timings})
                return
            latents, fallback_s = await self._work(_device_steps, self.fallback_model, state)
            self.ledger.complete(key, Source.HOST_FALLBACK, latents=latents, timings={"host_s": host_s, "host_batch": batch, "fallback_s": fallback_s})
        except Exception as exc:  # one request's failure must not end the link or leave the ledger open
            self.ledger.complete(key, Source.FAILED, error=f"{type(exc).__name__}: {exc}")
            message = f"request failed: {type(exc).__name__}: {exc}"[:1000]
            await self._send(session, Error(ErrorCode.REQUEST_FAILED.value, message, request.request_id))
        finally:
            self._in_flight -= 1

    async def _host_run(self, request: Any) -> tuple[RelayState, float, int]:
        """Queue ``request``'s host steps; returns (state, seconds of its host run, requests in that run)."""
        future: asyncio.Future[tuple[RelayState, float, int]] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
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
                first = self._pending[0][0]
                group = [p for p in self._pending if (p[0].steps, p[0].sampler) == (first.steps, first.sampler)]
                group = group[: self.config.max_batch]
                for p in group:
                    self._pending.remove(p)
                self.batch_sizes.append(len(group))
                t_run = time.perf_counter()
                try:
                    if len(group) == 1:  # the unbatched path: bit-identical to relaydiff.core.relay.start
                        results = [await self._work(_host_steps, self.host_model, first)]
                    else:
                        results = await self._work(_host_batch, self.host_model, [p[0] for p in group])
                except Exception as exc:  # every request of the run fails on its own (and is answered)
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self.host_busy_s += time.perf_counter() - t_run
                for (_, future), (state, seconds) in zip(group, results):
                    if not future.done():
                        future.set_result((state, seconds, len(group)))
        finally:
            self._batching = False

    async def _await_device(self, session: _Session, request: GenerateRequest, state: RelayState, t0: float) -> Result | None:
        """Hand the state over and wait for the device's Result; None when it will not come."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        session.waiting[request.request_id] = future  # registered before sending: a fast Result finds it
        if session.closed or not await self._send(session, RelayHandoff.from_state(request.request_id, state)):
            session.waiting.pop(request.request_id, None)
            return None
        remaining = request.deadline_s - (time.monotonic() - t0)
        wait = min(self.config.result_timeout_s, max(remaining, 0.0) + self.config.result_grace_s)
        try:
            return await asyncio.wait_for(future, wait)
        except (_NoResult, TimeoutError):
            session.waiting.pop(request.request_id, None)
            return None


def _host_steps(model: LoadedModel, request: Any) -> tuple[RelayState, float]:
    from relaydiff.core.relay import start

    t0 = time.perf_counter()
    state = start(model, request)
    return state, time.perf_counter() - t0


def _host_batch(model: LoadedModel, requests: list[Any]) -> list[tuple[RelayState, float]]:
    from relaydiff.core.relay import start_batch

    return start_batch(model, requests)


def _device_steps(model: LoadedModel, state: RelayState) -> tuple[Any, float]:
    from relaydiff.core.relay import resume

    t0 = time.perf_counter()
    latents = resume(model, state).latents
    return latents, time.perf_counter() - t0
