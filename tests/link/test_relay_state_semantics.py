"""Relay states that pass the structural checks but are semantically wrong are refused at validation (issue 19),
and `relaydiff resume` answers any crafted state file with a clear error, never a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaydiff.core.errors import RelayStateError
from relaydiff.core.state import RelayState
from relay_state_crafting import SEMANTIC, crafted, join, split


@pytest.fixture(scope="module")
def base_state(tiny_pair) -> bytes:  # type: ignore[no-untyped-def]
    from relaydiff.core.relay import start
    from relaydiff.runtime.settings import GenerationSettings

    return start(tiny_pair[0], GenerationSettings(steps=4).request("a red circle", 2)).to_bytes()


@pytest.mark.parametrize("name", sorted(SEMANTIC))
def test_semantically_invalid_states_are_refused(base_state: bytes, name: str) -> None:
    change, phrase = SEMANTIC[name]
    with pytest.raises(RelayStateError, match=phrase.replace("(", r"\(")):
        RelayState.from_bytes(crafted(base_state, change))


def test_the_base_state_itself_is_valid(base_state: bytes) -> None:
    tensors, meta = split(base_state)
    assert RelayState.from_bytes(join(tensors, meta)).step_index == 2


def resume(argv: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    from relaydiff.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("name", sorted(SEMANTIC))
def test_resume_refuses_each_crafted_state_with_a_clear_error(base_state, tiny_family, tmp_path: Path, capsys, name: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.safetensors"
    path.write_bytes(crafted(base_state, SEMANTIC[name][0]))
    code, output = resume(["resume", "--state", str(path), "--device", str(tiny_family), "--out", str(tmp_path / "x.png"), "--json"], capsys)
    assert code == 2 and "relaydiff: error: " in output and "Traceback" not in output
    assert not (tmp_path / "x.png").exists()  # nothing half-written


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_META_KEYS = ("step_index", "sampler", "scheduler_config", "guidance_scale", "history_ints", "prompt", "negative_prompt",
              "seed", "family_id", "format", "version")
_TENSOR_KEYS = ("latents", "timesteps", "prompt_embeds", "negative_prompt_embeds", "sigmas", "generator_state", "history.x")
_CONFIG_KEYS = ("timestep_spacing", "num_train_timesteps", "steps_offset", "beta_start", "beta_end", "beta_schedule",
                "prediction_type", "solver_order", "trained_betas", "clip_sample")
_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.float64])
_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=5)


@st.composite
def mutations(draw):  # type: ignore[no-untyped-def]
    """One to three changes: a metadata value, a scheduler setting, or a tensor's shape and dtype (or its removal)."""
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["meta", "config", "tensor", "drop"]))
        if kind == "meta":
            changes.append(("meta", draw(st.sampled_from(_META_KEYS)), draw(_json_values)))
        elif kind == "config":
            changes.append(("config", draw(st.sampled_from(_CONFIG_KEYS)), draw(_json_values)))
        elif kind == "tensor":
            changes.append(("tensor", draw(st.sampled_from(_TENSOR_KEYS)), (tuple(draw(_shapes)), draw(_dtypes), draw(st.floats(-1e6, 1e6)))))
        else:
            changes.append(("drop", draw(st.sampled_from(_TENSOR_KEYS)), None))
    return changes


def apply(base: bytes, changes) -> bytes:  # type: ignore[no-untyped-def]
    tensors, meta = split(base)
    for kind, key, value in changes:
        if kind == "meta":
            meta[key] = value
        elif kind == "config":
            config = meta.get("scheduler_config")  # an earlier change may have replaced it with a non-object
            meta["scheduler_config"] = {**(config if isinstance(config, dict) else {}), key: value}
        elif kind == "tensor":
            shape, dtype, fill = value
            tensors[key] = torch.full(shape, fill).to(dtype)
        else:
            tensors.pop(key, None)
    return join(tensors, json.loads(json.dumps(meta)))  # the metadata as a receiver decodes it


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=mutations())
def test_fuzzed_states_are_valid_or_refused_with_a_relay_state_error(base_state: bytes, changes) -> None:  # type: ignore[no-untyped-def]
    try:
        state = RelayState.from_bytes(apply(base_state, changes))
    except RelayStateError:
        return  # refused with a clear error: what we want; any other exception fails the test
    # accepted: then it must be a state a device can finish
    assert state.latents.numel() > 0 and bool(torch.isfinite(state.latents).all())
    assert 0 <= state.step_index <= state.timesteps.numel() and state.timesteps.numel() > 0
    assert math.isfinite(state.guidance_scale)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=mutations())
def test_resume_never_shows_a_traceback_for_a_fuzzed_state(base_state, tiny_family, tmp_path: Path, capsys, changes) -> None:  # type: ignore[no-untyped-def]
    path, out = tmp_path / "fuzz.safetensors", tmp_path / "fuzz.png"
    path.write_bytes(apply(base_state, changes))
    out.unlink(missing_ok=True)
    code, output = resume(["resume", "--state", str(path), "--device", str(tiny_family), "--out", str(out), "--json"], capsys)
    assert code in (0, 1, 2) and "Traceback" not in output
    assert (code == 0) == out.exists()
    if code == 1:  # valid, but for another family or schedule (e.g. a mutated family_id): every mismatch, as JSON
        assert "\"mismatches\": [{" in output
