"""User-facing errors. The CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class RelaydiffError(Exception):
    """An error caused by the user's input or files (not a bug in relaydiff)."""


class FamilyNotFoundError(RelaydiffError):
    """A model folder, or a file inside it, does not exist."""


class CompatibilityError(RelaydiffError):
    """Host and device models (or a relay state and a device) cannot relay: the fields that differ.

    ``mismatches`` lists every differing field as ``(field, host value, device value)``; ``field``,
    ``host_value`` and ``device_value`` are the first of them. The CLI exits 1 on it (a failed check).
    """

    exit_code = 1

    def __init__(self, field: str, host_value: Any, device_value: Any, *,
                 more: Sequence[tuple[str, Any, Any]] = (), subject: str = "host and device models") -> None:
        self.mismatches: list[tuple[str, Any, Any]] = [(field, host_value, device_value), *more]
        self.field = field
        self.host_value = host_value
        self.device_value = device_value
        parts = [f"{f} (host: {h!r}, device: {d!r})" for f, h, d in self.mismatches]
        head = (f"{subject} cannot relay: "
                + (f"{field} differs " if len(parts) == 1 else f"{len(parts)} fields differ: "))
        super().__init__(head + (f"(host: {host_value!r}, device: {device_value!r})" if len(parts) == 1 else "; ".join(parts)))

    @classmethod
    def of(cls, mismatches: Sequence[tuple[str, Any, Any]], *, subject: str = "host and device models") -> CompatibilityError:
        """The error for a non-empty list of ``(field, host value, device value)``."""
        (field, host, device), *more = mismatches
        return cls(field, host, device, more=more, subject=subject)

    def to_json(self) -> list[dict[str, Any]]:
        """Every mismatch as ``{"field", "host", "device"}``."""
        return [{"field": f, "host": h, "device": d} for f, h, d in self.mismatches]


class RelayStateError(RelaydiffError):
    """A relay state is malformed, oversized, non-finite or does not match the declared spec."""
