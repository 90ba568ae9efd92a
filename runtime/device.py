"""The device runtime: finish relayed states (or generate alone) with a backend, and describe the device.

    runtime = DeviceRuntime(create_backend("torch", family_dir=folder))
    image = runtime.finish(handoff.relay_state)      # relayed: parse + validate once, steps [k, N), decode
    image = runtime.generate(settings.request(p, 0)) # device-only

Before an image is returned the runtime applies the on-device safety checks (relaydiff.runtime.safety): the prompt
denylist (the bundle's and the user's; a matching prompt raises PromptDeniedError, nothing runs) and the backend's
safety checker (a flagged image is replaced by a black one); ``DeviceImage.safety`` says what was checked.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest
from relaydiff.core.state import RelayState
from relaydiff.link.events import DeviceCapabilities
from relaydiff.runtime.backends import Backend
from relaydiff.runtime.safety import UNCHECKED, SafetyReport, check_prompt, read_denylist, screen

MAX_STEPS_PER_SECOND = 10_000.0  # the protocol's cap on DeviceCapabilities.steps_per_second
MAX_IMAGE_PIXELS = 4096 * 4096  # the largest PNG (width x height) a device or host decodes from the link


@dataclass(frozen=True)
class DeviceImage:
    """One finished image and what it cost on the device."""

    image: np.ndarray  # (H, W, 3) uint8
    steps: int  # denoising steps the device ran
    start_step: int = 0  # k: the step the device started at (0 for device-only); it ran [k, k + steps)
    timings: dict[str, float] = field(default_factory=dict)  # "device_s" (steps), "decode_s" (VAE), seconds
    safety: SafetyReport = UNCHECKED  # what the runtime checked before returning the image (runtime.safety)

    def png(self) -> bytes:
        """The image as PNG bytes (lossless, so the receiver sees exactly these pixels)."""
        return encode_png(self.image)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise RelaydiffError(f"expected an (H, W, 3) uint8 image, got {image.dtype} of shape {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of PNG bytes, refusing images above ``max_pixels`` before decoding them.

    Raises:
        RelaydiffError: not a PNG, larger than ``max_pixels`` (width x height, read from the header first),
            or truncated/corrupt.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise RelaydiffError(f"PNG is {width}x{height} = {width * height} pixels; the cap is {max_pixels}")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, Image.DecompressionBombError) as exc:
        # Pillow's errors on hostile input (UnidentifiedImageError is an OSError)
        raise RelaydiffError(f"not a readable PNG: {type(exc).__name__}: {exc}") from None


class DeviceRuntime:
    """A device model behind a :class:`~relaydiff.runtime.backends.Backend`."""

    def __init__(self, backend: Backend, *, denylist: str | Path | Sequence[str] | None = None) -> None:
        """
        Args:
            backend: the device model. A backend with a ``safety_checker`` attribute (a callable: (H, W, 3) uint8
                image -> flagged) has every image screened; one with a ``denylist`` attribute (the bundle's) has its
                entries refused.
            denylist: the user's prompt denylist, added to the backend's: a file (one word or phrase a line) or entries.

        Raises:
            TypeError: ``backend`` does not implement the Backend protocol.
            RelaydiffError: the denylist file is unreadable or malformed.
        """
        if not isinstance(backend, Backend):
            raise TypeError(
                f"backend must implement name, family_id, bundle_id, bundle_sha256, encode_prompt, begin, finish "
                f"and decode; got {type(backend).__name__}"
            )
        self.backend = backend
        self._steps_per_second: float | None = None
        own = tuple(getattr(backend, "denylist", ()) or ())
        if isinstance(denylist, (str, Path)):
            user: tuple[str, ...] = read_denylist(denylist)
        else:
            from relaydiff.runtime.safety import parse_denylist

            user = parse_denylist("\n".join(denylist or ()), where="the user's denylist")
        self.denylist: tuple[str, ...] = tuple(dict.fromkeys((*own, *user)))
        self.safety_checker = getattr(backend, "safety_checker", None)

    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt the denylist holds.

        Raises:
            PromptDeniedError: naming the entry.
        """
        check_prompt(prompt, self.denylist, "the device's denylist (the bundle's and the user's)")

    def screen(self, image: np.ndarray) -> tuple[np.ndarray, SafetyReport]:
        """(the image to return, what was checked): the safety checker's verdict, a flagged image replaced by black."""
        return screen(image, self.safety_checker)

    def finish(self, state: RelayState | bytes) -> DeviceImage:
        """Run steps [k, N) of a relayed state and decode it.

        ``state`` is the hand-off's bytes (``RelayHandoff.relay_state``), parsed and validated here, once, or a
        RelayState built in this process, validated here. The backend's ``finish`` then runs the compatibility
        check (:func:`relaydiff.core.family.check_state`, through ``relay.resume``).

        Raises:
            PromptDeniedError: the state's prompt matches the denylist (checked before any step runs).
            RelayStateError: the bytes are not a valid relay state (over the link's cap included), or the latent
                does not fit the device model.
            CompatibilityError: the state belongs to another family or noise schedule (every mismatched field).
        """
        from relaydiff.core.state import validate
        from relaydiff.link.events import MAX_RELAY_STATE_BYTES

        if isinstance(state, (bytes, bytearray, memoryview)):
            state = RelayState.from_bytes(state, max_bytes=MAX_RELAY_STATE_BYTES)
        elif isinstance(state, RelayState):
            validate(state)
        else:
            raise TypeError(f"expected relay state bytes or a RelayState, got {type(state).__name__}")
        self.check_prompt(state.prompt)
        return self._finish(state)

    def _finish(self, state: RelayState) -> DeviceImage:
        t0 = time.perf_counter()
        latents = self.backend.finish(state)
        t1 = time.perf_counter()
        image = self.backend.decode(latents)[0]
        t2 = time.perf_counter()
        image, safety = self.screen(image)
        timings = {"device_s": t1 - t0, "decode_s": t2 - t1}
        if safety.checked:
            timings["safety_s"] = time.perf_counter() - t2
        return DeviceImage(image, state.num_inference_steps - state.step_index, state.step_index, timings, safety)

    def generate(self, request: RelayRequest) -> DeviceImage:
        """Device-only generation: every step of ``request`` on the device (its relay step is ignored).

        Raises:
            PromptDeniedError: the prompt matches the denylist (nothing runs).
        """
        self.check_prompt(request.prompt)
        t0 = time.perf_counter()
        state = self.backend.begin(request)
        t1 = time.perf_counter()
        out = self._finish(state)  # our own state: not validated (nothing crossed a boundary)
        return DeviceImage(out.image, out.steps, 0, {"encode_s": t1 - t0, **out.timings}, out.safety)

    def steps_per_second(self, *, steps: int = 2) -> float:
        """The device model's denoising speed, measured once on a short trajectory and then remembered."""
        if self._steps_per_second is None:
            from relaydiff.core.schedulers import fallback_sampler

            # a sampler that fits the family's schedule (a flow family refuses ddim)
            config = getattr(self.backend, "scheduler_config", None)
            sampler = fallback_sampler(config) if config is not None else "ddim"
            request = RelayRequest("a speed probe", relay_step=0, steps=steps, guidance_scale=5.0, sampler=sampler)
            # a backend that cannot encode prompts (a bundle without its family) still times its steps
            probe = getattr(self.backend, "probe_state", None)
            state = probe(request) if probe is not None else self.backend.begin(request)
            t0 = time.perf_counter()
            self.backend.finish(state)
            seconds = time.perf_counter() - t0
            self._steps_per_second = min(steps / max(seconds, 1e-6), MAX_STEPS_PER_SECOND)
        return self._steps_per_second

    def capabilities(self) -> DeviceCapabilities:
        """What this device announces in its Hello (measures the step speed on first use)."""
        return DeviceCapabilities(
            runtimes=(self.backend.name,),
            bundle_id=self.backend.bundle_id,
            bundle_sha256=self.backend.bundle_sha256,
            steps_per_second=self.steps_per_second(),
        )
