"""The device's side of the link: ask the host for an image, finish the relayed latent, report back.

Message flow per request (docs/protocol.md, sections 4 and 7):

1. device -> host ``GenerateRequest``;
2. host -> device ``Progress(k, N)``, then ``RelayHandoff`` (the relay state after the host's k steps), or ``Result``
   (a final latent) when the host ran every step, or a request ``Error``;
3. after a hand-off the device finishes steps [k, N), decodes, and sends ``Result`` (the PNG and
   its timings), then ``Feedback`` when it has a quality signal.

When the host cannot be reached (the connection is refused or times out), the link drops or the
host refuses the request before a hand-off arrived, or the device cannot use the state it got
(it then tells the host with a request ``Error``), the device generates alone (k = 0) and says
so in :attr:`DeviceOutcome.mode` and :attr:`DeviceOutcome.fallback_reason`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ssl import SSLContext

import numpy as np
from websockets.exceptions import InvalidHandshake, InvalidURI

from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.state import latents_from_bytes
from relaydiff.link.config import LinkConfig
from relaydiff.link.errors import ErrorCode, ProtocolError
from relaydiff.link.events import (
    MAX_RESULT_BYTES, Close, Error, Event, Feedback, GenerateRequest, Ping, Progress, RelayHandoff, Result, ResultKind,
)
from relaydiff.link.transport import Link, LinkClosed, connect
from relaydiff.runtime.device import DeviceImage, DeviceRuntime, decode_png, encode_png
from relaydiff.runtime.safety import UNCHECKED, SafetyReport
from relaydiff.runtime.settings import GenerationSettings

QualityFn = Callable[[np.ndarray, str], float]  # (image, prompt) -> quality in [0, 1], sent as Feedback.quality

RELAY = "relay"  # the host ran steps [0, k), the device [k, N)
HOST_ONLY = "host-only"  # the host ran every step; the device only decoded
DEVICE_ONLY = "device-only"  # the device ran every step on its own (fallback)

log = logging.getLogger(__name__)
_UNREACHABLE = (OSError, TimeoutError, LinkClosed, InvalidHandshake, InvalidURI)  # connect() failing to reach a host


@dataclass(frozen=True)
class DeviceOutcome:
    """One request's image, how it was made, and what it cost."""

    request_id: str
    prompt: str
    image: np.ndarray  # (H, W, 3) uint8
    mode: str  # RELAY, HOST_ONLY or DEVICE_ONLY
    relay_step: int  # k: steps the host ran (0 when device-only)
    steps: int  # N
    latency_s: float  # from sending the request (or starting alone) to the image
    timings: dict[str, float] = field(default_factory=dict)
    fallback_reason: str | None = None  # why the device generated alone, when it did
    safety: SafetyReport = UNCHECKED  # the device's safety checks on the image (runtime.safety), whoever made it

    def png(self) -> bytes:
        return encode_png(self.image)


class DeviceClient:
    """A device that asks a host over one link per :meth:`generate` call and finishes the relayed latents."""

    def __init__(
        self,
        runtime: DeviceRuntime,
        url: str,
        *,
        auth_token: str,
        settings: GenerationSettings | None = None,
        quality_preference: float = 0.5,
        deadline_s: float = 60.0,
        link_config: LinkConfig | None = None,
        quality_fn: QualityFn | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        """
        Args:
            runtime: the device model.
            url: the host's ``ws://`` or ``wss://`` address.
            auth_token: the shared link token.
            settings: what a device-only fallback runs (the host decides for relayed requests).
            quality_preference: 0 = fastest, 1 = best quality (``GenerateRequest.quality_preference``).
            deadline_s: how long to wait for the host's hand-off before generating alone.
            link_config: caps and timeouts of the link (``open_timeout_s`` bounds reaching the host).
            quality_fn: scores a finished image for ``Feedback``; without it no Feedback is sent.
            ssl: the client SSLContext for a ``wss://`` host (e.g. trusting a private CA); None: the system's.
        """
        if not isinstance(runtime, DeviceRuntime):
            raise TypeError(f"runtime must be a DeviceRuntime, got {type(runtime).__name__}")
        self.runtime = runtime
        self.url = url
        self.settings = settings if settings is not None else GenerationSettings()
        self.link_config = link_config if link_config is not None else LinkConfig()
        self.quality_fn = quality_fn
        self._auth_token = auth_token
        self._ssl = ssl
        # the protocol checks ranges when the event is built; build one now so a bad value fails here
        GenerateRequest("check", "", quality_preference, deadline_s)
        self.quality_preference = float(quality_preference)
        self.deadline_s = float(deadline_s)
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(4)

    def _next_id(self) -> str:
        return f"{self._tag}-{next(self._ids)}"

    async def generate(self, prompt: str) -> DeviceOutcome:
        """One image for ``prompt``: relayed when the host is reachable, device-only otherwise."""
        (outcome,) = await self.generate_many([prompt])
        return outcome

    async def generate_many(self, prompts: list[str]) -> list[DeviceOutcome]:
        """Images for ``prompts``, one request after another over a single link.

        Raises:
            PeerError: the host refused our Hello (e.g. a wrong token): a configuration error, not a fallback.
            PromptDeniedError: a prompt matches the device's denylist (checked first: nothing is sent or generated).
        """
        for prompt in prompts:
            self.runtime.check_prompt(prompt)
        capabilities = await asyncio.to_thread(self.runtime.capabilities)
        try:
            link: Link | None = await asyncio.wait_for(
                connect(self.url, auth_token=self._auth_token, capabilities=capabilities, config=self.link_config,
                        ssl=self._ssl),
                self.link_config.open_timeout_s + self.link_config.handshake_timeout_s,
            )
        except _UNREACHABLE as exc:
            reason = f"host {self.url} unreachable: {type(exc).__name__}: {exc}"
            return [await self._alone(self._next_id(), p, reason) for p in prompts]
        outcomes = []
        lost: str | None = None  # why the link is gone, once it is
        try:
            for prompt in prompts:
                if link is None or lost is not None:
                    outcomes.append(await self._alone(self._next_id(), prompt, lost or "no link"))
                    continue
                try:
                    outcomes.append(await self._relayed(link, prompt))
                except _Fallback as fallback:
                    outcomes.append(await self._alone(fallback.request_id, prompt, str(fallback)))
                    if not fallback.link_usable:
                        lost = str(fallback)
        finally:
            if link is not None:
                await link.close("done")
        return outcomes

    async def _alone(self, request_id: str, prompt: str, reason: str) -> DeviceOutcome:
        log.info("request %s: generating on the device alone: %s", request_id, reason)
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self.runtime.generate, self.settings.request(prompt, 0))
        return DeviceOutcome(
            request_id, prompt, out.image, DEVICE_ONLY, 0, self.settings.steps, time.perf_counter() - t0,
            out.timings, reason, out.safety,
        )

    async def _relayed(self, link: Link, prompt: str) -> DeviceOutcome:
        """One relayed request; a ``busy`` host is asked again after its retry-after while the deadline allows."""
        t0 = time.perf_counter()
        while True:
            try:
                return await self._attempt(link, prompt, t0)
            except _Busy as busy:
                remaining = self.deadline_s - (time.perf_counter() - t0)
                if busy.retry_after_s >= remaining:
                    raise _Fallback(busy.request_id, f"host busy (retry after {busy.retry_after_s:g} s): {busy}", True) from None
                await asyncio.sleep(busy.retry_after_s)

    async def _attempt(self, link: Link, prompt: str, t0: float) -> DeviceOutcome:
        request_id = self._next_id()
        total: int | None = None  # N, from the host's Progress
        try:
            deadline = self.deadline_s - (time.perf_counter() - t0)
            await link.send(GenerateRequest(request_id, prompt, self.quality_preference, deadline))
            while True:
                remaining = self.deadline_s - (time.perf_counter() - t0)
                if remaining <= 0:
                    raise TimeoutError(f"no hand-off within the {self.deadline_s} s deadline")
                event = await link.recv(timeout=remaining)
                if isinstance(event, Progress) and event.request_id == request_id:
                    total = event.total
                elif isinstance(event, Ping):
                    await link.send(event.pong())
                elif isinstance(event, RelayHandoff) and event.request_id == request_id:
                    break
                elif isinstance(event, Result) and event.request_id == request_id:
                    try:
                        return await self._host_only(event, prompt, t0, total)
                    except Exception as exc:  # an unreadable or oversized image from the host: tell it, then go alone
                        log.warning("request %s: cannot use the host's result: %s: %s", request_id, type(exc).__name__, exc)
                        await self._send_quietly(link, Error(ErrorCode.REQUEST_FAILED.value,
                                                             f"cannot use the result: {exc}"[:1000], request_id))
                        raise _Fallback(request_id, f"cannot use the host's result: {exc}", True) from None
                elif isinstance(event, Error) and event.request_id == request_id:
                    if event.code == ErrorCode.BUSY.value:
                        raise _Busy(request_id, event.message)
                    raise _Fallback(request_id, f"host refused request {request_id!r}: {event.code}: {event.message}", True)
                elif isinstance(event, (Close, Error)):
                    raise _Fallback(request_id, f"host ended the link before the hand-off ({type(event).__name__})")
        except (LinkClosed, TimeoutError, ProtocolError) as exc:  # a bad hand-off: recv already sent the host an Error
            log.warning("request %s: link lost before the hand-off: %s: %s", request_id, type(exc).__name__, exc)
            raise _Fallback(request_id, f"link lost before the hand-off: {type(exc).__name__}: {exc}") from None
        handoff_s = time.perf_counter() - t0
        try:  # the runtime parses and validates the bytes, once, then finishes them
            done = await asyncio.to_thread(self.runtime.finish, event.relay_state)
        except Exception as exc:  # e.g. a malformed state, or one from another family: never crash, tell the host
            log.warning("request %s: cannot finish the host's relay state: %s: %s", request_id, type(exc).__name__, exc)
            code = ErrorCode.BAD_RELAY_STATE if isinstance(exc, RelayStateError) else ErrorCode.REQUEST_FAILED
            await self._send_quietly(link, Error(code.value, f"{type(exc).__name__}: {exc}"[:1000], request_id))
            raise _Fallback(request_id, f"cannot finish the host's relay state: {exc}", True) from None
        latency = time.perf_counter() - t0
        await self._report(link, request_id, prompt, done, latency)
        return DeviceOutcome(
            request_id, prompt, done.image, RELAY, done.start_step, done.start_step + done.steps, latency,
            {"handoff_s": handoff_s, **done.timings}, safety=done.safety,
        )

    async def _host_only(self, result: Result, prompt: str, t0: float, total: int | None) -> DeviceOutcome:
        """The host ran every step: decode its final latent (or take its PNG)."""
        if result.kind is ResultKind.PNG:
            image = decode_png(result.data)
        else:
            latents = latents_from_bytes(result.data, max_bytes=MAX_RESULT_BYTES)  # the one parse of the host's latent
            image = (await asyncio.to_thread(self.runtime.backend.decode, latents))[0]
        image, safety = await asyncio.to_thread(self.runtime.screen, image)  # the host's image goes through the same check
        steps = total if total is not None else self.settings.steps
        return DeviceOutcome(
            result.request_id, prompt, image, HOST_ONLY, steps, steps, time.perf_counter() - t0, dict(result.timings),
            safety=safety,
        )

    async def _report(self, link: Link, request_id: str, prompt: str, done: DeviceImage, latency: float) -> None:
        """Send the Result (and Feedback); the image is ours already, so a lost link only loses the report."""
        if await self._send_quietly(link, Result(request_id, ResultKind.PNG, done.png(), done.timings)):
            if self.quality_fn is not None:
                quality = min(max(float(self.quality_fn(done.image, prompt)), 0.0), 1.0)
                await self._send_quietly(link, Feedback(request_id, latency, quality))

    @staticmethod
    async def _send_quietly(link: Link, event: Event) -> bool:
        """Send; False when the link is gone (the host then finishes the request itself)."""
        try:
            await link.send(event)
        except (LinkClosed, TimeoutError, ProtocolError):
            return False
        return True


class _Busy(RelaydiffError):
    """The host answered ``busy``; ``retry_after_s`` is read off the message's ``retry_after_s=`` prefix (1 s if absent)."""

    def __init__(self, request_id: str, message: str) -> None:
        self.request_id = request_id
        match = re.match(r"retry_after_s=([0-9]+(?:\.[0-9]+)?)", message)
        self.retry_after_s = min(float(match.group(1)), 3600.0) if match else 1.0
        super().__init__(message)


class _Fallback(RelaydiffError):
    """This request is generated on the device alone; ``link_usable``: later requests may still use the link."""

    def __init__(self, request_id: str, reason: str, link_usable: bool = False) -> None:
        self.request_id = request_id
        self.link_usable = link_usable
        super().__init__(reason)
