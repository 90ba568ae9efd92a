"""The host's per-request ledger: every accepted request ends with exactly one recorded result.

A request is *accepted* when the host takes its ``GenerateRequest`` and *completed* once, by
whoever finishes it first: the device (its ``Result``), the host (it ran every step, or it
finished a hand-off the device could not use), a cancellation (the device left, aborted the
request, or its deadline passed), an eviction (queued work given up, under a full queue, for a client
under its fair share) or a failure. A second completion is refused and counted in
:attr:`Ledger.refused_count`, which is how tests check the exactly-once guarantee.

The ledger keeps metadata and digests only, never the images or latents themselves: the kind,
size and SHA-256 of each result (:func:`digest_bytes`, :func:`digest_latents`). Completed entries
are forgotten once there are more than ``max_entries`` of them or they are older than
``max_age_s``; pending ones are never dropped (the host's queue cap bounds them).
Used from the event loop only (not thread-safe).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.events import Feedback

MAX_PROMPT_CHARS = 256  # characters of a prompt the ledger keeps (prompts may be 4096 bytes)
MAX_REFUSED_KEPT = 1000  # refused completions listed in Ledger.refused (all are counted)


class Source(str, Enum):
    """Who produced a request's result."""

    DEVICE = "device"  # the device finished the relay and sent its image
    HOST = "host"  # the policy chose k = N: the host ran every step
    HOST_FALLBACK = "host-fallback"  # the device could not use the hand-off; the host finished
    CANCELLED = "cancelled"  # the device left or aborted, or the deadline passed: the work was stopped
    EVICTED = "evicted"  # queued work given up for a client under its fair share; the device got Error(busy)
    FAILED = "failed"  # the request failed (an error was recorded instead of an image)


def digest_bytes(data: bytes) -> str:
    """SHA-256 (hex) of a result blob, e.g. a device's PNG."""
    return hashlib.sha256(data).hexdigest()


def digest_latents(latents: Any) -> str:
    """SHA-256 (hex) of a latent tensor's dtype, shape and raw bytes (equal digests: bitwise-equal tensors)."""
    import torch

    t = latents.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype (bfloat16 has no numpy view)
    return h.hexdigest()


@dataclass
class LedgerEntry:
    """One accepted request and, once completed, its single result (as metadata)."""

    key: str  # "<session id>/<request id>" ("#n" appended when a link reuses a request id)
    prompt: str  # the first MAX_PROMPT_CHARS characters
    accepted_at: float  # time.monotonic() when accepted
    relay_step: int | None = None  # k, once chosen
    steps: int | None = None  # N
    source: Source | None = None  # None while pending
    completed_at: float | None = None
    result_kind: str | None = None  # "png" (the device's image) or "latent" (the host's final latent)
    result_sha256: str | None = None  # digest of the result (digest_bytes / digest_latents)
    result_bytes: int = 0  # size of the PNG, or of the latent's raw data
    image_size: tuple[int, int] | None = None  # (width, height) of a PNG result
    timings: dict[str, float] = field(default_factory=dict)  # the host's own measurements
    device_timings: dict[str, float] = field(default_factory=dict)  # what the device's Result claimed
    error: str | None = None  # why it failed or was cancelled
    feedback: Feedback | None = None  # the device's Feedback, if any

    @property
    def done(self) -> bool:
        return self.source is not None


class Ledger:
    """Accepted requests by key, each completed at most once; completed ones bounded in number and age."""

    def __init__(self, *, max_entries: int = 10_000, max_age_s: float = 3600.0) -> None:
        """
        Args:
            max_entries: most completed entries kept (the oldest completed are forgotten first).
            max_age_s: completed entries older than this (since completion) are forgotten.
        """
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise RelaydiffError(f"Ledger max_entries must be a positive integer, got {max_entries!r}")
        if isinstance(max_age_s, bool) or not isinstance(max_age_s, (int, float)) or not math.isfinite(max_age_s) or max_age_s <= 0:
            raise RelaydiffError(f"Ledger max_age_s must be a positive number of seconds, got {max_age_s!r}")
        self.max_entries = max_entries
        self.max_age_s = float(max_age_s)
        self._entries: dict[str, LedgerEntry] = {}
        self._done: OrderedDict[str, float] = OrderedDict()  # completed keys, oldest completion first
        self.refused: list[tuple[str, Source]] = []  # the first MAX_REFUSED_KEPT refused completions
        self.refused_count = 0  # completions refused because the request was already done
        self.forgotten = 0  # completed entries dropped by the size and age bounds

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def accept(self, key: str, prompt: str) -> LedgerEntry:
        """Record a newly accepted request.

        Raises:
            RelaydiffError: ``key`` is in the ledger already.
        """
        self.prune()
        if key in self._entries:
            raise RelaydiffError(f"request {key!r} is already in the ledger")
        entry = LedgerEntry(key, prompt[:MAX_PROMPT_CHARS], time.monotonic())
        self._entries[key] = entry
        return entry

    def complete(
        self,
        key: str,
        source: Source,
        *,
        png: bytes | None = None,
        latents: Any = None,
        image_size: tuple[int, int] | None = None,
        timings: dict[str, float] | None = None,
        device_timings: Mapping[str, float] | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the result of ``key`` (its digest, not the data) unless it already has one; True when recorded.

        Raises:
            RelaydiffError: ``key`` was never accepted (or was already forgotten).
        """
        entry = self._entries.get(key)
        if entry is None:
            raise RelaydiffError(f"request {key!r} was never accepted")
        if entry.done:
            self.refused_count += 1
            if len(self.refused) < MAX_REFUSED_KEPT:
                self.refused.append((key, source))
            return False
        if png is not None:
            entry.result_kind, entry.result_sha256, entry.result_bytes = "png", digest_bytes(png), len(png)
            entry.image_size = image_size
        elif latents is not None:
            entry.result_kind, entry.result_sha256 = "latent", digest_latents(latents)
            entry.result_bytes = int(latents.numel() * latents.element_size())
        entry.timings = dict(timings or {})
        entry.device_timings = dict(device_timings or {})
        entry.error = error
        entry.source = source
        entry.completed_at = time.monotonic()
        self._done[key] = entry.completed_at
        self.prune()
        return True

    def prune(self) -> None:
        """Forget completed entries beyond ``max_entries`` or older than ``max_age_s``."""
        oldest_kept = time.monotonic() - self.max_age_s
        while self._done:
            key, completed_at = next(iter(self._done.items()))
            if len(self._done) <= self.max_entries and completed_at >= oldest_kept:
                break
            del self._done[key]
            del self._entries[key]
            self.forgotten += 1

    def find(self, key: str) -> LedgerEntry | None:
        """The entry of ``key``, or None (never accepted, or forgotten)."""
        return self._entries.get(key)

    def get(self, key: str) -> LedgerEntry:
        return self._entries[key]

    def entries(self) -> list[LedgerEntry]:
        """Every kept request, in acceptance order."""
        return list(self._entries.values())

    def pending(self) -> list[LedgerEntry]:
        """Accepted requests without a result yet."""
        return [e for e in self._entries.values() if not e.done]

    def __len__(self) -> int:
        return len(self._entries)
