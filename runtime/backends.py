"""Device backends: what actually runs the device model. Registered by name; ``torch`` is the reference.

A backend starts a trajectory on its own (``begin``: step 0, for device-only generation),
finishes a relayed one (``finish``: steps [k, N)) and decodes the final latent (``decode``).
ONNX Runtime and ExecuTorch backends will load exported bundles and register themselves the
same way; :func:`create_backend` refuses an unknown name with the list of known ones.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest
from relaydiff.core.state import RelayState


@runtime_checkable
class Backend(Protocol):
    """The device model behind a small interface (thread-safe for concurrent calls)."""

    name: str  # the runtime name announced to the host, e.g. "torch", "onnxruntime"
    family_id: str  # the latent space the model belongs to (RelayState.family_id)
    bundle_id: str  # what is installed: an *id* for the Hello capabilities
    bundle_sha256: str  # 64 lowercase hex digits identifying the installed weights

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (cond, uncond), each (1, L, D)."""
        ...

    def begin(self, request: RelayRequest) -> RelayState:
        """The state at step 0 of ``request`` (prompt encoded, initial noise drawn): device-only generation."""
        ...

    def finish(self, state: RelayState) -> torch.Tensor:
        """Run steps [k, N) of a relayed state; the final latent (B, C, H, W)."""
        ...

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode a final latent to (B, H, W, 3) uint8 images."""
        ...


BackendFactory = Callable[..., Backend]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class decorator: make a backend available to :func:`create_backend` under ``name``."""

    def wrap(factory: BackendFactory) -> BackendFactory:
        if name in BACKENDS:
            raise RelaydiffError(f"backend {name!r} is already registered")
        BACKENDS[name] = factory
        return factory

    return wrap


def create_backend(name: str, **options: Any) -> Backend:
    """Build the backend registered as ``name`` with its keyword options.

    Raises:
        RelaydiffError: ``name`` is not registered (the message lists the known backends).
    """
    factory = BACKENDS.get(name)
    if factory is None:
        raise RelaydiffError(f"unknown device backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    return factory(**options)


def _as_id(text: str) -> str:
    """``text`` made into a protocol *id* (``[A-Za-z0-9][A-Za-z0-9._:-]*``, at most 128 bytes)."""
    clean = re.sub(r"[^A-Za-z0-9._:-]", "-", text).lstrip("._:-")[:128]
    return clean or "unnamed"


@register_backend("torch")
class TorchBackend:
    """The reference backend: the family's device variant in PyTorch, run with relaydiff.core.relay."""

    name = "torch"

    def __init__(self, *, family_dir: str | Path | None = None, variant: str | None = None, model: Any = None) -> None:
        """
        Args:
            family_dir: a family (or pipeline) folder; default: relaydiff's default family.
            variant: the family variant to load; default: the family's default device variant.
            model: an already loaded :class:`~relaydiff.core.family.LoadedModel` (then nothing is loaded).

        Raises:
            TypeError: both ``model`` and ``family_dir``/``variant`` were given.
            RelaydiffError / FamilyNotFoundError: the folder or variant does not exist.
        """
        from relaydiff.core import family

        if model is not None:
            if family_dir is not None or variant is not None:
                raise TypeError("TorchBackend takes either model= or family_dir=/variant=, not both")
        else:
            ref = family.resolve(family_dir if family_dir is not None else family.default_family_dir(), variant, role="device")
            model = family.load(ref)
        self.model = model
        self.family_id: str = model.family_id
        self.bundle_id = _as_id(f"{model.family_id}:{model.ref.variant}")
        # the torch backend has no exported bundle: identify the weights by family id and the device UNet config
        unet_config = (Path(model.ref.root) / model.ref.unet_subfolder / "config.json").read_bytes()
        self.bundle_sha256 = hashlib.sha256(self.bundle_id.encode() + b"\0" + unet_config).hexdigest()

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        from relaydiff.core.relay import encode_prompt

        return encode_prompt(self.model, prompt, negative_prompt)

    def begin(self, request: RelayRequest) -> RelayState:
        from relaydiff.core.relay import start

        return start(self.model, replace(request, relay_step=0))

    def finish(self, state: RelayState) -> torch.Tensor:
        from relaydiff.core.relay import resume

        return resume(self.model, state).latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        from relaydiff.core.relay import decode

        return decode(self.model, latents)
