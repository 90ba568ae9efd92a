"""The host's per-request ledger: every accepted request ends with exactly one recorded result.

A request is *accepted* when the host takes its ``GenerateRequest`` and *completed* once, by
whoever finishes it first: the device (its ``Result``), the host (it ran every step, or it
finished a hand-off the device never answered), or a failure. A second completion is refused
and counted in :attr:`Ledger.refused`, which is how tests check the exactly-once guarantee.
Used from the event loop only (not thread-safe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.events import Feedback


class Source(str, Enum):
    """Who produced a request's result."""

    DEVICE = "device"  # the device finished the relay and sent its image
    HOST = "host"  # the policy chose k = N: the host ran every step
    HOST_FALLBACK = "host-fallback"  # the device vanished or timed out after the hand-off; the host finished
    FAILED = "failed"  # the request failed (an error was recorded instead of an image)


@dataclass
class LedgerEntry:
    """One accepted request and, once completed, its single result."""

    key: str  # "<session id>/<request id>": request ids are only unique per link
    prompt: str
    accepted_at: float  # time.monotonic() when accepted
    relay_step: int | None = None  # k, once chosen
    steps: int | None = None  # N
    source: Source | None = None  # None while pending
    completed_at: float | None = None
    png: bytes | None = None  # the device's image (Source.DEVICE)
    latents: Any = None  # the host's final latent (Source.HOST, Source.HOST_FALLBACK)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why it failed (Source.FAILED)
    feedback: Feedback | None = None  # the device's Feedback, if any

    @property
    def done(self) -> bool:
        return self.source is not None


class Ledger:
    """Accepted requests by key, each completed at most once."""

    def __init__(self) -> None:
        self._entries: dict[str, LedgerEntry] = {}
        self.refused: list[tuple[str, Source]] = []  # completions refused because the request was already done

    def accept(self, key: str, prompt: str) -> LedgerEntry:
        """Record a newly accepted request.

        Raises:
            RelaydiffError: ``key`` was accepted before (a bug: the link refuses reused open ids).
        """
        if key in self._entries:
            raise RelaydiffError(f"request {key!r} is already in the ledger")
        entry = LedgerEntry(key, prompt, time.monotonic())
        self._entries[key] = entry
        return entry

    def complete(self, key: str, source: Source, **result: Any) -> bool:
        """Record the result of ``key`` unless it already has one; True when this call recorded it.

        Raises:
            RelaydiffError: ``key`` was never accepted.
        """
        entry = self._entries.get(key)
        if entry is None:
            raise RelaydiffError(f"request {key!r} was never accepted")
        if entry.done:
            self.refused.append((key, source))
            return False
        for name, value in result.items():
            if not hasattr(entry, name):
                raise TypeError(f"LedgerEntry has no field {name!r}")
            setattr(entry, name, value)
        entry.source = source
        entry.completed_at = time.monotonic()
        return True

    def get(self, key: str) -> LedgerEntry:
        return self._entries[key]

    def entries(self) -> list[LedgerEntry]:
        """Every accepted request, in acceptance order."""
        return list(self._entries.values())

    def pending(self) -> list[LedgerEntry]:
        """Accepted requests without a result yet."""
        return [e for e in self._entries.values() if not e.done]

    def __len__(self) -> int:
        return len(self._entries)
