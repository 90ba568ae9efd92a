"""Split policies: how many of a request's N steps the host runs before handing over (the relay step k).

A policy sees the request, the device's announced capabilities and N, and returns k in [0, N];
it may learn from the device's ``Feedback``. A :class:`BudgetPolicy` also chooses the device's cache budget. :class:`FixedPolicy` is the first one;
:class:`~relaydiff.host.bandit.BanditPolicy` (a contextual bandit) implements the same protocol and also
:class:`ContextualPolicy`, which also sees the serving :class:`Conditions` (host load, network, device load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.events import DeviceCapabilities, Feedback, GenerateRequest


@runtime_checkable
class Policy(Protocol):
    """Chooses the relay step of each request and may learn from feedback."""

    def choose(self, request: GenerateRequest, capabilities: DeviceCapabilities | None, steps: int) -> int:
        """The relay step k in [0, steps] for ``request``."""
        ...

    def observe(self, request: GenerateRequest, relay_step: int, feedback: Feedback) -> None:
        """Learn from how a finished request went."""
        ...


@dataclass(frozen=True)
class Conditions:
    """What the host knows about serving conditions when it chooses k (None: not measured)."""

    host_queue: int = 0  # other requests accepted and not yet finished by the host
    host_utilisation: float = 0.0  # busy host worker threads / all of them, in [0, 1]
    rtt_s: float | None = None  # link round-trip time estimate in seconds (None: use the policy's default)
    bandwidth_mbit_s: float | None = None  # link bandwidth estimate in Mbit/s (None: use the policy's default)
    device_load: float | None = None  # the device's own load in [0, 1] (None: use the policy's default)


@runtime_checkable
class ContextualPolicy(Policy, Protocol):
    """A policy that also uses the serving conditions; the controller calls :meth:`choose_in` instead of choose."""

    def choose_in(self, request: GenerateRequest, capabilities: DeviceCapabilities | None, steps: int, conditions: Conditions) -> int:
        """The relay step k in [0, steps] for ``request`` under ``conditions``."""
        ...


@runtime_checkable
class BudgetPolicy(Policy, Protocol):
    """A policy that also chooses the device's cache budget B (feature caching); the controller puts it in the relay state."""

    def device_budget(self, request: GenerateRequest, relay_step: int, steps: int) -> int | None:
        """B in [1, steps - relay_step] for the request it just chose ``relay_step`` for, or None (every device step full)."""
        ...


@runtime_checkable
class PersistentPolicy(Policy, Protocol):
    """A policy that keeps its learnt state in a file: the host calls :meth:`flush` off its event loop."""

    autosave: bool  # flush on every observation (the host server turns this off and flushes in a worker thread)

    @property
    def dirty(self) -> bool:
        """True when something learnt is not yet in the file."""
        ...

    def flush(self) -> bool:
        """Write what is not yet saved (thread-safe against observe); True when something was written."""
        ...


@dataclass(frozen=True)
class FixedPolicy:
    """k = round(f * N), with f fixed or read off the request's quality preference.

    Without ``fraction``, f = min_fraction + quality_preference * (max_fraction - min_fraction):
    a device asking for speed gets the hand-off early, one asking for quality lets the host do more.
    """

    fraction: float | None = None  # a fixed f in [0, 1]; None: derive f from the request's quality preference
    min_fraction: float = 0.2  # f for quality_preference = 0 (fastest)
    max_fraction: float = 0.8  # f for quality_preference = 1 (best quality)

    def __post_init__(self) -> None:
        for name in ("fraction", "min_fraction", "max_fraction"):
            value = getattr(self, name)
            if value is None and name == "fraction":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
                raise RelaydiffError(f"FixedPolicy.{name} must be a number in [0, 1], got {value!r}")
        if self.min_fraction > self.max_fraction:
            raise RelaydiffError(f"FixedPolicy.min_fraction {self.min_fraction} exceeds max_fraction {self.max_fraction}")

    def choose(self, request: GenerateRequest, capabilities: DeviceCapabilities | None, steps: int) -> int:
        if self.fraction is not None:
            f = self.fraction
        else:
            f = self.min_fraction + request.quality_preference * (self.max_fraction - self.min_fraction)
        return min(max(round(f * steps), 0), steps)

    def observe(self, request: GenerateRequest, relay_step: int, feedback: Feedback) -> None:
        return None  # a fixed policy learns nothing
