"""Relay-aware calibration records the device's UNet inputs only after the hand-off; whole-trajectory records all steps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

K, STEPS = 3, 10  # as in conftest.py


def _grid(device: Any) -> list[int]:
    from relaydiff.core.schedulers import build_scheduler

    s = build_scheduler("ddim", device.scheduler_config)
    s.set_timesteps(STEPS)
    return [int(t) for t in s.timesteps]


def test_relay_calibration_holds_only_device_steps(calibration_sets: Any, tiny_pair: Any) -> None:
    cs = calibration_sets["relay"]
    grid = _grid(tiny_pair[1])
    assert cs.step_indices == list(range(K, STEPS)) * 3  # three prompts, each device steps [K, N)
    assert cs.timesteps == grid[K:] * 3
    assert all(int(x["timestep"][0]) in grid[K:] for x in cs.for_component("unet_step"))
    assert max(cs.timesteps) < grid[K - 1]  # nothing from the host's steps
    assert cs.summary()["step_range"] == [K, STEPS]


def test_calibration_inputs_match_the_declared_unet_step_signature(calibration_sets: Any, tiny_pair: Any) -> None:
    from relaydiff.export import check_inputs, get_component

    sig = get_component("unet_step").signature(tiny_pair[1])
    for x in calibration_sets["relay"].for_component("unet_step")[:3]:
        check_inputs(sig, x)  # names, dtypes, shapes
        assert x["guidance_scale"][0] == 5.0
        assert not np.allclose(x["text_embeds"][0], x["text_embeds"][1])  # [uncond, cond] differ
    assert len(calibration_sets["relay"].for_component("vae_decoder")) == 3
    assert len(calibration_sets["relay"].for_component("text_encoder")) == 3


def test_whole_calibration_holds_every_step(calibration_sets: Any, tiny_pair: Any) -> None:
    cs = calibration_sets["whole"]
    assert cs.step_indices == list(range(STEPS)) * 3
    assert cs.timesteps == _grid(tiny_pair[1]) * 3


def test_relay_capture_is_the_relay_the_device_runs(calibration_sets: Any, tiny_pair: Any) -> None:
    """The final latents recorded equal a plain relay's final latents (recording changes nothing)."""
    from relaydiff.core.relay import RelayRequest, resume, start
    from relaydiff.world import sample_prompts

    host, device = tiny_pair
    prompt = sample_prompts(0, 3)[0]
    state = start(host, RelayRequest(prompt=prompt, relay_step=K, steps=STEPS, seed=0))
    final = resume(device, state).latents
    got = calibration_sets["relay"].for_component("vae_decoder")[0]["latent"]
    assert torch.allclose(final, torch.from_numpy(got), atol=1e-6)


def test_hand_offs_use_the_given_prompt_list(tiny_pair: Any) -> None:
    from relaydiff.quantize.calibration import CalibrationConfig, hand_offs

    listed = ("a red circle", "two green squares")
    got = [(p, s.step_index) for p, s in hand_offs(*tiny_pair, CalibrationConfig(relay_steps=(2,), steps=4, prompts=2, prompt_list=listed))]
    assert got == [("a red circle", 2), ("two green squares", 2)]
