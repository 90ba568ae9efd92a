"""The link's events: frozen dataclasses that validate themselves on construction.

Each event declares its JSON fields in one schema (``_SCHEMA``: name -> field spec), its
wire type code and, if it carries one, which field is the binary blob and that blob's cap.
The same schema checks events we build and events decoded from the peer, so both sides
obey one set of rules; :mod:`relaydiff.link.wire` only frames them.

Invalid values raise :class:`~relaydiff.link.errors.LocalProtocolError` (code
``invalid_field`` or ``bad_blob``) quoting the value; the decoder turns that into a
RemoteProtocolError when the value came from the peer.

Blobs are bytes here: the link caps their size (and checks a PNG's signature) but never parses a relay
state or a latent. The layer that consumes one parses and validates it once (``RelayState.from_bytes``
and ``latents_from_bytes`` in :mod:`relaydiff.core.state`), so this package needs no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, ClassVar

from relaydiff.link.errors import ErrorCode, LocalProtocolError

PROTOCOL_VERSION = 2  # the version this module speaks; travels in every header and in Hello/HelloAck (2: + RefineHandoff, RefineResult)
MIB = 1024 * 1024
MIN_MESSAGE_CAP = 64 * 1024  # the smallest receive cap a peer may announce
MAX_MESSAGE_CAP = 1024 * MIB  # the largest receive cap a peer may announce (blob length is a u32)
DEFAULT_MAX_MESSAGE_BYTES = 16 * MIB
MAX_RELAY_STATE_BYTES = 16 * MIB  # an SD-size relay state is ~0.5 MiB (the consumer parses it: RelayState.from_bytes)
MAX_RESULT_BYTES = 16 * MIB  # a 1024x1024 PNG or a final latent
MAX_LATENT_BYTES = 16 * MIB  # a reverse hand-off's preview latent (an SD-size one is 64 KiB)
MAX_PADDING_BYTES = 4 * MIB  # Ping/Pong padding for bandwidth probes
MAX_ERROR_MESSAGE_BYTES = 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")  # request and session ids: ASCII, no spaces
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # runtime names and timing keys
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Role(str, Enum):
    """Which end of the relay a side is: the host runs the first steps, the device the rest."""

    HOST = "host"
    DEVICE = "device"

    @property
    def other(self) -> "Role":
        return Role.DEVICE if self is Role.HOST else Role.HOST


def _show(value: Any) -> str:
    """repr of a bad value, cut so an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(where: str, value: Any, expected: str, code: ErrorCode = ErrorCode.INVALID_FIELD) -> LocalProtocolError:
    return LocalProtocolError(code, f"{where} is {_show(value)}; expected {expected}")


# -- field specs ---------------------------------------------------------------------------
# Hand-written rather than jsonschema: a dozen flat records, and the checks must also apply to
# events built in Python (tuples, enums, bytes), which a JSON validator does not see.


@dataclass(frozen=True)
class _Spec:
    optional: bool = False  # may be absent / None (null in JSON; senders omit it)

    def check(self, where: str, value: Any) -> Any:
        """Validate a Python value; return it normalized (tuple for list, enum for str, ...)."""
        raise NotImplementedError

    def to_json(self, value: Any) -> Any:
        return value

    def from_json(self, where: str, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class _Str(_Spec):
    max_bytes: int = 256  # cap on the UTF-8 encoded length
    min_bytes: int = 0
    pattern: re.Pattern[str] | None = None

    def check(self, where: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise _bad(where, value, "a string")
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise _bad(where, value, "valid Unicode (no lone surrogates)") from None
        if not self.min_bytes <= n <= self.max_bytes:
            raise _bad(where, value, f"{self.min_bytes} to {self.max_bytes} UTF-8 bytes, got {n}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _bad(where, value, f"a string matching {self.pattern.pattern}")
        return value


@dataclass(frozen=True)
class _Choice(_Spec):
    choices: type[Enum] = Role

    def check(self, where: str, value: Any) -> Any:
        try:
            return self.choices(value)
        except (ValueError, TypeError):
            raise _bad(where, value, f"one of {[c.value for c in self.choices]}") from None

    def to_json(self, value: Any) -> Any:
        return value.value


@dataclass(frozen=True)
class _Int(_Spec):
    lo: int = 0
    hi: int = 2**32 - 1

    def check(self, where: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, value, f"an integer in [{self.lo}, {self.hi}]")
        if not self.lo <= value <= self.hi:
            raise _bad(where, value, f"an integer in [{self.lo}, {self.hi}]")
        return int(value)


@dataclass(frozen=True)
class _Float(_Spec):
    lo: float = 0.0
    hi: float = 1.0
    lo_open: bool = False  # True: the range is (lo, hi]

    def check(self, where: str, value: Any) -> Any:
        span = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}]"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, value, f"a number in {span}")
        try:
            x = float(value)
        except OverflowError:  # a huge JSON integer
            raise _bad(where, value, f"a number in {span}") from None
        if not math.isfinite(x) or x < self.lo or x > self.hi or (self.lo_open and x == self.lo):
            raise _bad(where, value, f"a finite number in {span}")
        return x


@dataclass(frozen=True)
class _StrList(_Spec):
    item: _Str = _Str()
    min_items: int = 0
    max_items: int = 16

    def check(self, where: str, value: Any) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _bad(where, value, "a list of strings")
        if not self.min_items <= len(value) <= self.max_items:
            raise _bad(where, value, f"{self.min_items} to {self.max_items} items, got {len(value)}")
        return tuple(self.item.check(f"{where}[{i}]", v) for i, v in enumerate(value))

    def to_json(self, value: Any) -> Any:
        return list(value)


@dataclass(frozen=True)
class _FloatMap(_Spec):
    key: _Str = _Str()
    value: _Float = _Float()
    max_items: int = 32

    def check(self, where: str, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _bad(where, value, "an object of numbers")
        if len(value) > self.max_items:
            raise _bad(where, value, f"at most {self.max_items} entries, got {len(value)}")
        out = {self.key.check(f"{where} key", k): self.value.check(f"{where}[{k!r}]", v) for k, v in value.items()}
        return MappingProxyType(out)

    def to_json(self, value: Any) -> Any:
        return dict(value)


@dataclass(frozen=True)
class _Nested(_Spec):
    record: type["_Record"] | None = None

    def check(self, where: str, value: Any) -> Any:
        assert self.record is not None
        if not isinstance(value, self.record):
            raise _bad(where, value, f"a {self.record.__name__}")
        return value

    def to_json(self, value: Any) -> Any:
        return value.to_json()

    def from_json(self, where: str, value: Any) -> Any:
        assert self.record is not None
        if not isinstance(value, dict):
            raise _bad(where, value, "a JSON object")
        return self.record.from_json(value, where=where)


_REQUEST_ID = _Str(min_bytes=1, max_bytes=64, pattern=_ID)


class _Record:
    """A frozen dataclass whose JSON fields are declared in ``_SCHEMA``."""

    _SCHEMA: ClassVar[dict[str, _Spec]] = {}

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key, spec in self._SCHEMA.items():
            value = getattr(self, key)
            if value is None and spec.optional:
                continue
            object.__setattr__(self, key, spec.check(f"{name}.{key}", value))
        self._check()

    def _check(self) -> None:
        """Cross-field checks beyond the schema (override)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this record's scalar fields (None-valued optional fields omitted)."""
        return {k: spec.to_json(getattr(self, k)) for k, spec in self._SCHEMA.items() if getattr(self, k) is not None}

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, where: str | None = None, **extra: Any) -> Any:
        """Build from a decoded JSON object: required keys present, no unknown keys, values checked."""
        where = where or cls.__name__
        unknown = sorted(set(obj) - set(cls._SCHEMA))
        if unknown:
            raise LocalProtocolError(
                ErrorCode.INVALID_FIELD, f"{where} has unknown keys {_show(unknown)}; expected only {sorted(cls._SCHEMA)}"
            )
        missing = sorted(k for k, spec in cls._SCHEMA.items() if not spec.optional and k not in obj)
        if missing:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"{where} lacks required keys {missing}")
        kwargs = {k: cls._SCHEMA[k].from_json(f"{where}.{k}", v) for k, v in obj.items()}
        return cls(**kwargs, **extra)


class Event(_Record):
    """Base class of every event. ``TYPE_CODE`` is the u16 in the header."""

    TYPE_CODE: ClassVar[int] = 0
    BLOB_FIELD: ClassVar[str | None] = None  # the bytes field sent as the binary blob, if any
    MAX_BLOB: ClassVar[int] = 0  # cap on the blob length in bytes

    def __post_init__(self) -> None:
        if self.BLOB_FIELD is not None:
            where = f"{type(self).__name__}.{self.BLOB_FIELD}"
            blob = getattr(self, self.BLOB_FIELD)
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise _bad(where, blob, "bytes", ErrorCode.BAD_BLOB)
            blob = bytes(blob)
            if len(blob) > self.MAX_BLOB:
                raise LocalProtocolError(
                    ErrorCode.MESSAGE_TOO_LARGE, f"{where} is {len(blob)} bytes; the cap is {self.MAX_BLOB}"
                )
            object.__setattr__(self, self.BLOB_FIELD, blob)
        super().__post_init__()

    @property
    def blob(self) -> bytes:
        """The binary part of this event on the wire (empty when it has none)."""
        return getattr(self, self.BLOB_FIELD) if self.BLOB_FIELD is not None else b""


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCapabilities(_Record):
    """What a device can run, announced in its Hello."""

    runtimes: tuple[str, ...]  # runtimes the device can execute, e.g. ("coreml", "executorch")
    bundle_id: str  # the installed device-model bundle
    bundle_sha256: str  # sha256 of that bundle, 64 lowercase hex digits
    steps_per_second: float  # measured denoising speed of the device model

    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "runtimes": _StrList(item=_Str(min_bytes=1, max_bytes=32, pattern=_NAME), min_items=1, max_items=16),
        "bundle_id": _Str(min_bytes=1, max_bytes=128, pattern=_ID),
        "bundle_sha256": _Str(min_bytes=64, max_bytes=64, pattern=_SHA256),
        "steps_per_second": _Float(lo=0.0, hi=10_000.0, lo_open=True),
    }


@dataclass(frozen=True)
class Hello(Event):
    """The first message of a link, from the side that opened it."""

    role: Role  # the sender's role
    auth_token: str = field(repr=False)  # shared secret; never printed
    capabilities: DeviceCapabilities | None = None  # required when role is device, absent for host
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the largest message the sender accepts
    protocol_version: int = PROTOCOL_VERSION  # must equal the header's version

    TYPE_CODE: ClassVar[int] = 1
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "role": _Choice(choices=Role),
        "auth_token": _Str(min_bytes=1, max_bytes=256),
        "capabilities": _Nested(record=DeviceCapabilities, optional=True),
        "max_message_bytes": _Int(lo=MIN_MESSAGE_CAP, hi=MAX_MESSAGE_CAP),
        "protocol_version": _Int(lo=0, hi=0xFFFF),
    }

    def _check(self) -> None:
        if (self.role is Role.DEVICE) != (self.capabilities is not None):
            raise _bad("Hello.capabilities", self.capabilities, f"capabilities exactly when role is device (role {self.role.value!r})")


@dataclass(frozen=True)
class HelloAck(Event):
    """The answer to a Hello that passed version, auth and role checks."""

    role: Role  # the sender's role
    session_id: str  # chosen by the acknowledging side, for logs
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the largest message the sender accepts
    protocol_version: int = PROTOCOL_VERSION

    TYPE_CODE: ClassVar[int] = 2
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "role": _Choice(choices=Role),
        "session_id": _Str(min_bytes=1, max_bytes=64, pattern=_ID),
        "max_message_bytes": _Int(lo=MIN_MESSAGE_CAP, hi=MAX_MESSAGE_CAP),
        "protocol_version": _Int(lo=0, hi=0xFFFF),
    }


@dataclass(frozen=True)
class GenerateRequest(Event):
    """Device -> host: generate an image for this prompt."""

    request_id: str  # chosen by the device, unique among its open requests
    prompt: str
    quality_preference: float  # 0 = fastest (relay early), 1 = best quality (host runs more steps)
    deadline_s: float  # seconds from sending by which the device wants the image

    TYPE_CODE: ClassVar[int] = 3
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "request_id": _REQUEST_ID,
        "prompt": _Str(max_bytes=4096),
        "quality_preference": _Float(lo=0.0, hi=1.0),
        "deadline_s": _Float(lo=0.0, hi=3600.0, lo_open=True),
    }


@dataclass(frozen=True)
class RelayHandoff(Event):
    """Host -> device: the relay state after the host's steps; the device resumes from it.

    ``relay_state`` is the ``RelayState.to_bytes()`` buffer, carried as bytes (capped at ``MAX_BLOB``): the
    device runtime parses and validates it once (``RelayState.from_bytes``), and refuses a bad one with a
    request ``Error`` ``bad_relay_state``.
    """

    request_id: str
    relay_state: bytes = field(repr=False)  # RelayState.to_bytes(): a safetensors buffer (the blob)

    TYPE_CODE: ClassVar[int] = 4
    BLOB_FIELD: ClassVar[str | None] = "relay_state"
    MAX_BLOB: ClassVar[int] = MAX_RELAY_STATE_BYTES
    _SCHEMA: ClassVar[dict[str, _Spec]] = {"request_id": _REQUEST_ID}


class ResultKind(str, Enum):
    """What a Result's blob holds."""

    PNG = "png"  # a PNG image
    LATENT = "latent"  # a safetensors buffer with one finite float tensor "latents" of shape (B, C, H, W) (checked by the consumer)


@dataclass(frozen=True)
class Result(Event):
    """Either direction: the finished image or final latent of a request, with timings."""

    request_id: str
    kind: ResultKind
    data: bytes = field(repr=False)  # the blob: PNG bytes or a latent safetensors buffer (relaydiff.core.state.latents_to_bytes)
    timings: Mapping[str, float] = field(default_factory=dict)  # stage name -> seconds

    TYPE_CODE: ClassVar[int] = 6
    BLOB_FIELD: ClassVar[str | None] = "data"
    MAX_BLOB: ClassVar[int] = MAX_RESULT_BYTES
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "request_id": _REQUEST_ID,
        "kind": _Choice(choices=ResultKind),
        "timings": _FloatMap(key=_Str(min_bytes=1, max_bytes=64, pattern=_NAME), value=_Float(hi=86_400.0)),
    }

    def _check(self) -> None:
        if self.kind is ResultKind.PNG and not self.data.startswith(PNG_SIGNATURE):
            raise _bad("Result.data", self.data[:8], f"a PNG (starting {PNG_SIGNATURE!r})", ErrorCode.BAD_BLOB)
        # a latent is parsed by its consumer (relaydiff.core.state.latents_from_bytes), not by the link


@dataclass(frozen=True)
class Progress(Event):
    """Either direction: ``step`` of ``total`` denoising steps of a request are done."""

    request_id: str
    step: int  # steps done, 0..total
    total: int  # steps in the whole trajectory

    TYPE_CODE: ClassVar[int] = 5
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "request_id": _REQUEST_ID,
        "step": _Int(lo=0, hi=10_000),
        "total": _Int(lo=1, hi=10_000),
    }

    def _check(self) -> None:
        if self.step > self.total:
            raise _bad("Progress.step", self.step, f"at most total = {self.total}")


@dataclass(frozen=True)
class Feedback(Event):
    """Device -> host: how a finished request went, for the host's split policy."""

    request_id: str
    latency_s: float  # seconds from sending the GenerateRequest to the image on screen
    quality: float  # quality signal in [0, 1] (1 = best), e.g. a normalized image score

    TYPE_CODE: ClassVar[int] = 7
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "request_id": _REQUEST_ID,
        "latency_s": _Float(lo=0.0, hi=86_400.0),
        "quality": _Float(lo=0.0, hi=1.0),
    }


@dataclass(frozen=True)
class Error(Event):
    """Either direction: something failed. With a request id only that request ends; without, the link does."""

    code: str  # an ErrorCode value
    message: str  # human-readable, for logs
    request_id: str | None = None

    TYPE_CODE: ClassVar[int] = 8
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "code": _Str(min_bytes=1, max_bytes=64),
        "message": _Str(max_bytes=MAX_ERROR_MESSAGE_BYTES),
        "request_id": _Str(min_bytes=1, max_bytes=64, pattern=_ID, optional=True),
    }

    def _check(self) -> None:
        try:
            ErrorCode(self.code)
        except ValueError:
            raise _bad("Error.code", self.code, f"one of {[c.value for c in ErrorCode]}") from None

    @property
    def error_code(self) -> ErrorCode:
        return ErrorCode(self.code)


@dataclass(frozen=True)
class Ping(Event):
    """Either direction: liveness and round-trip/bandwidth probe; answered by a Pong."""

    nonce: int  # echoed in the Pong
    timestamp: float  # sender's clock in seconds, echoed in the Pong
    padding: bytes = field(default=b"", repr=False)  # the blob: filler bytes to probe bandwidth

    TYPE_CODE: ClassVar[int] = 9
    BLOB_FIELD: ClassVar[str | None] = "padding"
    MAX_BLOB: ClassVar[int] = MAX_PADDING_BYTES
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "nonce": _Int(lo=0, hi=2**32 - 1),
        "timestamp": _Float(lo=0.0, hi=1e12),
    }

    def pong(self, *, echo_padding: bool = False) -> "Pong":
        """The answer to this ping (echoing the padding measures the return path too)."""
        return Pong(self.nonce, self.timestamp, self.padding if echo_padding else b"")


@dataclass(frozen=True)
class Pong(Event):
    """The answer to a Ping: its nonce and timestamp echoed."""

    nonce: int
    timestamp: float  # the Ping's timestamp, unchanged
    padding: bytes = field(default=b"", repr=False)

    TYPE_CODE: ClassVar[int] = 10
    BLOB_FIELD: ClassVar[str | None] = "padding"
    MAX_BLOB: ClassVar[int] = MAX_PADDING_BYTES
    _SCHEMA: ClassVar[dict[str, _Spec]] = Ping._SCHEMA


@dataclass(frozen=True)
class Close(Event):
    """Either direction: the sender is done; the receiver closes the socket (both may send Close at once)."""

    reason: str = ""

    TYPE_CODE: ClassVar[int] = 11
    _SCHEMA: ClassVar[dict[str, _Spec]] = {"reason": _Str(max_bytes=256)}


@dataclass(frozen=True)
class RefineHandoff(Event):
    """Device -> host (protocol 2): the reverse hand-off. The device's preview latent (a clean x_0); the host
    re-noises it to ``strength`` (absent: the host's predictor chooses) and runs the rest of its ``steps``."""

    request_id: str  # chosen by the device; a new request (exactly once, like GenerateRequest)
    family_id: str  # the latent space the preview belongs to; must be the host's
    prompt: str  # the final round's prompt
    steps: int  # N of the host's full schedule
    sampler: str  # one of relaydiff.core.schedulers.SAMPLERS (checked by the host)
    guidance_scale: float
    seed: int  # noise seed of the re-noising and of a stochastic sampler
    latent: bytes = field(repr=False)  # the blob: safetensors with one tensor "latents" (1, C, h, w); capped here,
    #   parsed and checked by the host that consumes it (relaydiff.core.state.latents_from_bytes), once
    strength: float | None = None  # in (0, 1]; None: the host predicts it

    TYPE_CODE: ClassVar[int] = 12
    BLOB_FIELD: ClassVar[str | None] = "latent"
    MAX_BLOB: ClassVar[int] = MAX_LATENT_BYTES
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "request_id": _REQUEST_ID,
        "family_id": _Str(min_bytes=1, max_bytes=128),
        "prompt": _Str(min_bytes=1, max_bytes=4096),
        "steps": _Int(lo=1, hi=1000),
        "sampler": _Str(min_bytes=1, max_bytes=32, pattern=_NAME),
        "guidance_scale": _Float(lo=0.0, hi=100.0),
        "seed": _Int(lo=0, hi=2**63 - 1),
        "strength": _Float(lo=0.0, hi=1.0, lo_open=True, optional=True),
    }

    def _check(self) -> None:
        if not self.prompt.strip():
            raise _bad("RefineHandoff.prompt", self.prompt, "a non-empty prompt")


@dataclass(frozen=True)
class RefineResult(Event):
    """Host -> device (protocol 2): the refined image of a RefineHandoff, the strength used and the host's cost."""

    request_id: str
    strength: float  # the strength the host refined at, in (0, 1]
    host_unet_evals: int  # UNet evaluations the host spent (its predictor's probe included)
    data: bytes = field(repr=False)  # the blob: the refined image as a PNG
    timings: Mapping[str, float] = field(default_factory=dict)  # stage name -> seconds

    TYPE_CODE: ClassVar[int] = 13
    BLOB_FIELD: ClassVar[str | None] = "data"
    MAX_BLOB: ClassVar[int] = MAX_RESULT_BYTES
    _SCHEMA: ClassVar[dict[str, _Spec]] = {
        "request_id": _REQUEST_ID,
        "strength": _Float(lo=0.0, hi=1.0, lo_open=True),
        "host_unet_evals": _Int(lo=0, hi=1_000_000),
        "timings": _FloatMap(key=_Str(min_bytes=1, max_bytes=64, pattern=_NAME), value=_Float(hi=86_400.0)),
    }

    def _check(self) -> None:
        if not self.data.startswith(PNG_SIGNATURE):
            raise _bad("RefineResult.data", self.data[:8], f"a PNG (starting {PNG_SIGNATURE!r})", ErrorCode.BAD_BLOB)


EVENT_TYPES: dict[int, type[Event]] = {
    cls.TYPE_CODE: cls
    for cls in (Hello, HelloAck, GenerateRequest, RelayHandoff, Progress, Result, Feedback, Error, Ping, Pong, Close,
                RefineHandoff, RefineResult)
}

