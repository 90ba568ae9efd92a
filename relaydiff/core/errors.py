"""User-facing errors. The CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations

from typing import Any


class RelaydiffError(Exception):
    """An error caused by the user's input or files (not a bug in relaydiff)."""


class FamilyNotFoundError(RelaydiffError):
    """A model folder, or a file inside it, does not exist."""


class CompatibilityError(RelaydiffError):
    """Host and device models cannot relay: one field differs between them."""

    def __init__(self, field: str, host_value: Any, device_value: Any) -> None:
        self.field = field
        self.host_value = host_value
        self.device_value = device_value
        super().__init__(
            f"host and device models cannot relay: {field} differs "
            f"(host: {host_value!r}, device: {device_value!r})"
        )


class RelayStateError(RelaydiffError):
    """A relay state is malformed, oversized, non-finite or does not match the declared spec."""
