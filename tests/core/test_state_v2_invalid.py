"""Relay state version 2: old versions are refused with a clear error; the added conditioning and the flow
schedule are checked (shapes, CFG twins, shift, mu, sigmas). States are built by hand: no model needed."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from relaydiff.core.errors import RelayStateError
from relaydiff.core.schedulers import build_scheduler, scheduler_config, set_steps
from relaydiff.core.state import RelayState, validate

N = 4


@pytest.fixture(scope="module")
def flow_state() -> RelayState:
    sch = build_scheduler("flow_euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                         "shift": 3.0})
    set_steps(sch, N)
    g = torch.Generator().manual_seed(0)
    return RelayState(
        latents=torch.randn(1, 16, 4, 4, generator=g), step_index=2, timesteps=sch.timesteps.clone(), sampler="flow_euler",
        scheduler_config=scheduler_config(sch), guidance_scale=4.0, prompt_embeds=torch.randn(1, 8, 32, generator=g),
        negative_prompt_embeds=torch.zeros(1, 8, 32), sigmas=sch.sigmas.clone(),
        pooled_projections=torch.randn(1, 32, generator=g), negative_pooled_projections=torch.zeros(1, 32),
    )


def _rewrite(state: RelayState, meta: dict[str, Any]) -> bytes:
    data = state.to_bytes()
    n = int.from_bytes(data[:8], "little")
    m = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["relaydiff"])
    m.update(meta)
    return save(load(data), metadata={"relaydiff": json.dumps(m)})


def test_a_flow_state_round_trips_with_its_schedule(flow_state: RelayState) -> None:
    again = RelayState.from_bytes(flow_state.to_bytes())
    assert again.noise_schedule == flow_state.noise_schedule and again.noise_schedule["shift"] == 3.0
    assert torch.equal(again.pooled_projections, flow_state.pooled_projections)  # type: ignore[arg-type]
    assert again.conditioning().pooled_projections is not None and again.negative_conditioning() is not None


def test_version_1_is_refused_with_the_reason(flow_state: RelayState) -> None:
    with pytest.raises(RelayStateError, match=r"version 1 is not supported; expected 2 \(version 1 predates"):
        RelayState.from_bytes(_rewrite(flow_state, {"version": 1}))


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"noise_schedule": {"shift": 1.0}}, "noise_schedule 'shift' is 1.0"),  # merged into the real schedule below
        ({"noise_schedule": {"kind": "sde"}}, "kind 'diffusion' or 'flow'"),
        ({"mu": 0.5}, "mu is 0.5"),
        ({"sampler": "ddim"}, "noise_schedule 'kind'|does not sample"),
    ],
)
def test_bad_schedule_metadata(flow_state: RelayState, meta: dict[str, Any], match: str) -> None:
    if "noise_schedule" in meta and "kind" not in meta["noise_schedule"]:
        meta = {"noise_schedule": {**flow_state.noise_schedule, **meta["noise_schedule"]}}
    with pytest.raises(RelayStateError, match=match):
        RelayState.from_bytes(_rewrite(flow_state, meta))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"negative_pooled_projections": None}, "needs negative_pooled_projections"),
        ({"pooled_projections": None}, "travels without pooled_projections"),
        ({"pooled_projections": torch.zeros(1, 2, 32)}, r"must be \(B, W\)"),
        ({"pooled_projections": torch.full((1, 32), float("nan"))}, "finite"),
        ({"negative_pooled_projections": torch.zeros(1, 16)}, "differs"),
        ({"time_ids": torch.zeros(2, 6)}, "B = 1"),
        ({"sigmas": None}, "must carry its sigmas"),
        ({"sigmas": torch.linspace(2, 0, N + 1)}, r"lie in \[0, 1\]"),
    ],
)
def test_bad_added_conditioning_and_sigmas(flow_state: RelayState, changes: dict[str, Any], match: str) -> None:
    with pytest.raises(RelayStateError, match=match):
        validate(replace(flow_state, **changes))  # built unvalidated; the consumer validates once
