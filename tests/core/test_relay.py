"""The relay invariants: relaying a model to itself is exact; host and device halves compose."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest, decode, relay, resume, start, start_batch
from relaydiff.core.schedulers import SAMPLERS
from relaydiff.core.state import RelayState

N = 6
DIFFUSION = sorted(name for name, spec in SAMPLERS.items() if not spec.flow)  # the tiny family's (flow: test_relay_styles)


@pytest.mark.parametrize("sampler", DIFFUSION)
def test_self_relay_equals_no_relay_at_every_k(tiny_pair, sampler: str) -> None:
    host, _ = tiny_pair
    base = RelayRequest("a red circle left of a blue square", relay_step=N, steps=N, sampler=sampler, seed=7)
    reference = relay(host, host, base)
    for k in range(N + 1):
        got = relay(host, host, replace(base, relay_step=k))
        assert torch.allclose(got.latents, reference.latents, atol=1e-5, rtol=0), (sampler, k)
        assert abs(got.images.astype(int) - reference.images.astype(int)).max() <= 1, (sampler, k)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_relay_state_carries_what_the_sampler_needs(tiny_pair, sampler: str) -> None:
    host, _ = tiny_pair
    state = start(host, RelayRequest("a green square", relay_step=3, steps=N, sampler=sampler, seed=1))
    if sampler == "dpmpp_2m":
        assert state.history_ints["lower_order_nums"] == 2
        assert set(state.history) == {"model_outputs.0", "model_outputs.1"}
        # Dropping the history changes the continuation: the history is really used.
        stripped = replace(state, history={}, history_ints={"solver_order": 2, "lower_order_nums": 0})
        a, b = resume(host, state), resume(host, stripped)
        assert not torch.allclose(a.latents, b.latents, atol=1e-4)
    else:
        assert state.generator_state is not None and state.history == {}
        other = torch.Generator().manual_seed(123).get_state()
        a, b = resume(host, state), resume(host, replace(state, generator_state=other))
        assert not torch.allclose(a.latents, b.latents, atol=1e-4)


def test_relay_to_smaller_device_differs_but_stays_close_in_norm(tiny_pair) -> None:
    host, device = tiny_pair
    req = RelayRequest("a yellow triangle", relay_step=N, steps=N, seed=3)
    host_only = relay(host, device, req)
    relayed = relay(host, device, replace(req, relay_step=2))
    device_only = relay(host, device, replace(req, relay_step=0))
    assert relayed.host_seconds > 0 and relayed.device_seconds > 0
    assert device_only.host_seconds == 0.0
    assert not torch.allclose(relayed.latents, host_only.latents)
    assert relayed.images.shape == (1, 16, 16, 3) and relayed.images.dtype.name == "uint8"
    assert len(relayed.norms) == N


def test_state_round_trip_through_bytes_is_identical(tiny_pair) -> None:
    host, _ = tiny_pair
    for sampler in DIFFUSION:
        state = start(host, RelayRequest("a purple circle", relay_step=2, steps=N, sampler=sampler, guidance_scale=4.0))
        data = state.to_bytes()
        again = RelayState.from_bytes(data)
        assert again.to_bytes() == data
        assert torch.equal(again.latents, state.latents) and again.step_index == 2
        assert again.scheduler_config == state.scheduler_config


def test_resume_partial_then_rest_equals_resume_all(tiny_pair) -> None:
    host, device = tiny_pair
    state = start(host, RelayRequest("a red square", relay_step=1, steps=N, sampler="dpmpp_2m"))
    mid = RelayState.from_bytes(resume(device, state, end=4).to_bytes())
    assert torch.allclose(resume(device, mid).latents, resume(device, state).latents, atol=1e-5)
    assert decode(device, resume(device, mid).latents).shape == (1, 16, 16, 3)


def test_no_cfg_needs_no_negative_embeddings(tiny_pair) -> None:
    host, _ = tiny_pair
    state = start(host, RelayRequest("a red square", relay_step=2, steps=4, guidance_scale=1.0))
    assert state.negative_prompt_embeds is None
    assert resume(host, state).step_index == 4


def test_snapshots_of_one_trajectory_equal_separate_starts(tiny_pair) -> None:
    from relaydiff.core.relay import snapshots

    host, _ = tiny_pair
    req = RelayRequest("a red square", relay_step=0, steps=N, sampler="dpmpp_2m", seed=5)
    snaps = snapshots(host, req, [0, 2, 5])
    assert sorted(snaps) == [0, 2, 5]
    for k, (state, seconds) in snaps.items():
        alone = start(host, replace(req, relay_step=k))
        assert state.to_bytes() == alone.to_bytes()
        assert seconds > 0


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a"])
def test_batched_host_steps_match_one_request_at_a_time(tiny_pair, sampler: str) -> None:
    host, _ = tiny_pair
    reqs = [
        RelayRequest("a red circle", relay_step=4, steps=N, sampler=sampler, seed=1),
        RelayRequest("a blue square above a green diamond", relay_step=2, steps=N, sampler=sampler, seed=2),
        RelayRequest("a cyan triangle", relay_step=0, steps=N, sampler=sampler, seed=3),
        RelayRequest("an orange circle", relay_step=N, steps=N, sampler=sampler, seed=4, guidance_scale=1.0),
        RelayRequest("a red circle", relay_step=3, steps=N, sampler=sampler, seed=1, guidance_scale=7.5),
    ]
    batched = start_batch(host, reqs)
    assert len(batched) == len(reqs)
    for req, (state, seconds) in zip(reqs, batched):
        alone = start(host, req)
        assert state.step_index == req.relay_step and state.prompt == req.prompt and seconds >= 0
        assert torch.allclose(state.latents, alone.latents, atol=1e-4, rtol=0), (sampler, req)
        assert torch.equal(state.timesteps, alone.timesteps)
        assert set(state.history) == set(alone.history)
        for key in state.history:
            assert torch.allclose(state.history[key], alone.history[key], atol=1e-4, rtol=0)
        # the device finishes a batched state exactly as it finishes the unbatched one
        assert torch.allclose(resume(host, state).latents, resume(host, alone).latents, atol=1e-3, rtol=0)


class _Dropped(Exception):
    pass


def test_a_request_dropped_from_a_batch_between_steps_stops_there_and_the_others_go_on(tiny_pair, monkeypatch) -> None:
    """A batch of 3; the second request's device leaves after its step 1: the host computes no more of its steps."""
    import relaydiff.core.relay as relay_module
    from relaydiff.core.relay import encode_prompt, relay_side

    host, _ = tiny_pair
    reqs = [RelayRequest(f"prompt {c}", relay_step=N, steps=N, sampler="dpmpp_2m", seed=i) for i, c in enumerate("abc")]
    conds = [encode_prompt(host, r.prompt)[0] for r in reqs]
    calls = [0, 0, 0]  # denoiser rows computed per request (conditional rows: one per step and request)

    class Counting:  # the real denoiser, counting the rows whose text embeddings are each request's
        def __init__(self, inner):  # type: ignore[no-untyped-def]
            self.inner = inner
            self.latent_spec, self.text_embed_dim = inner.latent_spec, inner.text_embed_dim

        def __call__(self, x, t, conditioning):  # type: ignore[no-untyped-def]
            for row in conditioning.text_embeds:
                for j, cond in enumerate(conds):
                    calls[j] += bool(torch.equal(row, cond[0]))
            return self.inner(x, t, conditioning)

    def counting_side(model):  # type: ignore[no-untyped-def]
        return replace(relay_side(model), denoiser=Counting(relay_side(model).denoiser))

    monkeypatch.setattr(relay_module, "relay_side", counting_side)
    seen: list[tuple[int, int]] = []

    def leaves_after_step_1(i: int, t: int, latents: torch.Tensor) -> None:
        seen.append((i, t))
        if i == 1:
            raise _Dropped("the device left")

    out = start_batch(host, reqs, on_step=[None, leaves_after_step_1, None])
    assert len(out) == 3 and isinstance(out[1], _Dropped) and [i for i, _ in seen] == [0, 1]  # called once per step, stopped
    assert calls == [N, 2, N]  # the dropped request cost the host 2 steps, not N
    monkeypatch.undo()
    for j in (0, 2):  # the others finish as an unbatched run does (up to the batched UNet's rounding)
        state, _ = out[j]  # type: ignore[misc]
        alone = start(host, reqs[j])
        assert state.step_index == N and torch.allclose(state.latents, alone.latents, atol=1e-4, rtol=0)
        for key in alone.history:
            assert torch.allclose(state.history[key], alone.history[key], atol=1e-4, rtol=0)
    with pytest.raises(RelaydiffError, match="one callback per request"):
        start_batch(host, reqs, on_step=[None])


def test_a_batched_request_is_ready_as_soon_as_it_reaches_its_k(tiny_pair) -> None:
    """on_ready hands a short request's state out before the batch runs the longer one's remaining steps."""
    host, _ = tiny_pair
    reqs = [RelayRequest("a red circle", relay_step=1, steps=N, seed=1), RelayRequest("a blue square", relay_step=N, steps=N, seed=2)]
    order: list[tuple[str, int]] = []
    out = start_batch(host, reqs, on_step=[None, lambda i, t, x: order.append(("step", i))],
                      on_ready=lambda j, state, seconds: order.append(("ready", j)))
    assert order == [("ready", 0), *[("step", i) for i in range(N)], ("ready", 1)]  # request 0 is out after step 0
    assert all(isinstance(o, tuple) and o[0].step_index == r.relay_step for o, r in zip(out, reqs))


def test_batched_host_steps_refuse_mixed_step_counts(tiny_pair) -> None:
    host, _ = tiny_pair
    reqs = [RelayRequest("a red circle", relay_step=1, steps=N), RelayRequest("a red circle", relay_step=1, steps=N + 1)]
    with pytest.raises(RelaydiffError, match="share steps"):
        start_batch(host, reqs)
    assert start_batch(host, []) == []
