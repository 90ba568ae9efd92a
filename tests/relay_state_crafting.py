"""Crafted relay-state buffers for robustness tests: a valid state's tensors and metadata, changed, re-serialized
without RelayState's checks (so the receiver's validation is what is tested)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save

Tensors = dict[str, torch.Tensor]
Meta = dict[str, Any]


def split(data: bytes) -> tuple[Tensors, Meta]:
    """A relay-state buffer's tensors and its decoded 'relaydiff' metadata."""
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(load(data)), json.loads(header["__metadata__"]["relaydiff"])


def join(tensors: Tensors, meta: Meta) -> bytes:
    """Serialize tensors and metadata as a relay-state buffer, unchecked (json writes NaN as NaN)."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"relaydiff": json.dumps(meta)})


def _set(t: Tensors, m: Meta, **changes: Any) -> None:
    m.update(changes)


def _config(t: Tensors, m: Meta, **changes: Any) -> None:
    m["scheduler_config"] = {**m["scheduler_config"], **changes}


# name -> (change in place, a phrase the refusal names)
SEMANTIC: dict[str, tuple[Callable[[Tensors, Meta], None], str]] = {
    "zero-size latent": (lambda t, m: t.update(latents=torch.zeros(1, t["latents"].shape[1], 0, 8)), "zero-size"),
    "bogus timestep_spacing": (lambda t, m: _config(t, m, timestep_spacing="sideways"), "timestep_spacing"),
    "junk generator state": (lambda t, m: t.update(generator_state=torch.arange(100, dtype=torch.uint8)), "generator_state"),
    "2M-step grid": (lambda t, m: t.update(timesteps=torch.arange(2_000_000, dtype=torch.int32).flip(0)), "steps; the cap is 10000"),
    "guidance NaN": (lambda t, m: _set(t, m, guidance_scale=float("nan")), "guidance scale is nan"),
    "guidance 1e9": (lambda t, m: _set(t, m, guidance_scale=1e9), "guidance scale"),
    "num_train_timesteps 0": (lambda t, m: _config(t, m, num_train_timesteps=0), "num_train_timesteps"),
    "steps_offset huge": (lambda t, m: _config(t, m, steps_offset=10**12), "steps_offset"),
    "beta_schedule unknown": (lambda t, m: _config(t, m, beta_schedule="cubic"), "beta_schedule"),
    "trained_betas": (lambda t, m: _config(t, m, trained_betas=[0.5] * 3), "trained_betas"),
    "history_ints negative": (lambda t, m: _set(t, m, history_ints={"lower_order_nums": -5}), "history_ints"),
    "timesteps off the training range": (lambda t, m: t.update(timesteps=t["timesteps"] + 10**6), "timesteps must lie"),
    "seed beyond 64 bits": (lambda t, m: _set(t, m, seed=1 << 80), "64-bit"),
}


def crafted(base: bytes, change: Callable[[Tensors, Meta], None]) -> bytes:
    tensors, meta = split(base)
    change(tensors, meta)
    return join(tensors, meta)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (RGB) and holds almost no data: a decompression-bomb shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
