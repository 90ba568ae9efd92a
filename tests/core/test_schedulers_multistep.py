"""PNDM and UniPC carry their multistep state in the relay state (the self-relay invariant is in test_relay.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest, resume, start
from relaydiff.core.schedulers import build_scheduler, set_steps

N = 6


def test_pndm_state_holds_its_outputs_and_counter(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    host, _ = tiny_pair
    state = start(host, RelayRequest("a green square", relay_step=3, steps=N, sampler="pndm", seed=1))
    assert len(state.timesteps) == N  # N UNet calls, like every other sampler
    assert state.history_ints["counter"] == 3 and state.history_ints["ets"] == 2
    assert {"ets.0", "ets.1"} <= set(state.history)
    stripped = replace(state, history={}, history_ints={"ets": 0, "counter": 0})
    assert not torch.allclose(resume(host, state).latents, resume(host, stripped).latents, atol=1e-4)


def test_unipc_state_holds_history_and_corrector_sample(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    host, _ = tiny_pair
    state = start(host, RelayRequest("a green square", relay_step=3, steps=N, sampler="unipc", seed=1))
    assert {"model_outputs.0", "model_outputs.1", "last_sample"} <= set(state.history)
    assert state.history_ints["lower_order_nums"] == 2 and state.history_ints["this_order"] >= 1
    no_corrector = {k: v for k, v in state.history.items() if k != "last_sample"}
    a, b = resume(host, state), resume(host, replace(state, history=no_corrector))
    assert not torch.allclose(a.latents, b.latents, atol=1e-4)


def test_pndm_needs_two_steps(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    sched = build_scheduler("pndm", tiny_pair[0].scheduler_config)
    with pytest.raises(RelaydiffError, match="pndm sampler needs at least 2 steps, got 1"):
        set_steps(sched, 1)
