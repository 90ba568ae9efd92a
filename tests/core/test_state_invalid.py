"""A relay state from the wire or a file is checked: caps, format, version, shapes, dtypes, finiteness."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save

from relaydiff.core.errors import RelayStateError
from relaydiff.core.relay import RelayRequest, resume, start
from relaydiff.core.state import RelayState


@pytest.fixture(scope="module")
def state(tiny_pair) -> RelayState:
    return start(tiny_pair[0], RelayRequest("a red circle", relay_step=2, steps=5, sampler="dpmpp_2m"))


def _rewrite(state: RelayState, *, meta: dict | None = None, tensors: dict | None = None) -> bytes:
    data = state.to_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    m = json.loads(header["__metadata__"]["relaydiff"])
    m.update(meta or {})
    from safetensors.torch import load

    ts = load(data)
    ts.update(tensors or {})
    return save(ts, metadata={"relaydiff": json.dumps(m)})


def test_oversized_is_refused_before_parsing(state: RelayState) -> None:
    with pytest.raises(RelayStateError, match="cap"):
        RelayState.from_bytes(state.to_bytes(), max_bytes=100)


@pytest.mark.parametrize("cut", [0, 4, 9, 200, -1])
def test_truncated_or_garbage_is_refused(state: RelayState, cut: int) -> None:
    data = state.to_bytes()
    with pytest.raises(RelayStateError):
        RelayState.from_bytes(data[:cut])
    with pytest.raises(RelayStateError):
        RelayState.from_bytes(b"\x00" * 16 + data[16:])


def test_not_bytes(state: RelayState) -> None:
    with pytest.raises(RelayStateError, match="bytes"):
        RelayState.from_bytes("hello")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"version": 99}, "version 99"),
        ({"format": "other"}, "not a relay state"),
        ({"step_index": 9}, "outside"),
        ({"step_index": -1}, "outside"),
        ({"step_index": "2"}, "step_index"),
        ({"sampler": "plms"}, "unknown sampler"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_metadata(state: RelayState, meta: dict, match: str) -> None:
    with pytest.raises(RelayStateError, match=match):
        RelayState.from_bytes(_rewrite(state, meta=meta))


def test_missing_metadata(state: RelayState) -> None:
    with pytest.raises(RelayStateError, match="metadata"):
        RelayState.from_bytes(save({"latents": state.latents}))


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "NaN"),
        ({"latents": torch.full((1, 4, 8, 8), float("inf"))}, "NaN or Inf"),
        ({"latents": torch.zeros(4, 8, 8)}, "4-D"),
        ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.int32)}, "dtype"),
        ({"prompt_embeds": torch.zeros(2, 16, 32)}, "prompt_embeds"),
        ({"history.model_outputs.0": torch.zeros(1, 4, 4, 4)}, "history"),
        ({"pickle": torch.zeros(1)}, "unexpected"),
        ({"timesteps": torch.zeros(0, dtype=torch.int64)}, "timesteps"),
        ({"timesteps": torch.zeros(5, dtype=torch.float8_e4m3fn)}, "timesteps must be finite"),
        ({"history.model_outputs.0": torch.zeros(1, 4, 8, 8, dtype=torch.float8_e4m3fn)}, "float tensor"),
        ({"history.model_outputs.0": torch.zeros(1, 4, 8, 8, dtype=torch.bool)}, "float tensor"),
        ({"prompt_embeds": torch.zeros(1, 16, 32, dtype=torch.float8_e4m3fn)}, "prompt_embeds"),
        ({"generator_state": torch.zeros(2, 2, dtype=torch.uint8)}, "generator_state"),
    ],
)
def test_bad_tensors(state: RelayState, tensors: dict, match: str) -> None:
    with pytest.raises(RelayStateError, match=match):
        RelayState.from_bytes(_rewrite(state, tensors=tensors))


def test_device_refuses_wrong_latent_shape(tiny_pair, state: RelayState) -> None:
    host, _ = tiny_pair
    bad = replace(state, latents=torch.zeros(1, 3, 8, 8), history={}, history_ints={"solver_order": 2, "lower_order_nums": 0})
    with pytest.raises(RelayStateError, match="channels"):
        resume(host, bad)


def test_device_refuses_tampered_timestep_grid(tiny_pair, state: RelayState) -> None:
    host, _ = tiny_pair
    with pytest.raises(RelayStateError, match="timestep grid"):
        resume(host, replace(state, timesteps=state.timesteps.flip(0)))
