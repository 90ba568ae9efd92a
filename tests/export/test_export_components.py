"""Component declarations: registry, family-fixed shapes, realistic inputs, and wrappers that compute what the relay computes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from relaydiff.export import check_inputs, get_component, list_components

COMPONENTS = ["unet_step", "unet", "vae_decoder", "text_encoder", "unet_step_full", "unet_step_cached"]
FAMILY_SPECIFIC = ["safety_checker"]  # needs a family with a safety checker: tests/runtime/test_safety.py


def test_registry_lists_every_component() -> None:
    assert list_components() == sorted(COMPONENTS + FAMILY_SPECIFIC)


def test_signatures_are_fixed_from_the_family(device_model: Any) -> None:
    sig = get_component("unet_step").signature(device_model)
    shapes = {s.name: s.shape for s in (*sig.inputs, *sig.outputs)}
    assert shapes == {
        "sample": (1, 4, 8, 8), "timestep": (1,), "text_embeds": (2, 16, 32), "guidance_scale": (1,),
        "noise_pred": (1, 4, 8, 8),
    }
    vae = get_component("vae_decoder").signature(device_model)
    assert vae.outputs[0].shape == (1, 3, 16, 16)
    te = get_component("text_encoder").signature(device_model)
    assert (te.inputs[0].dtype, te.inputs[0].shape, te.outputs[0].shape) == ("int32", (1, 16), (1, 16, 32))


@pytest.mark.parametrize("name", COMPONENTS)
def test_example_inputs_match_the_declaration_and_the_reference_is_finite(device_model: Any, name: str) -> None:
    c = get_component(name)
    sig = c.signature(device_model)
    inputs = c.example_inputs(device_model)
    check_inputs(sig, inputs)  # raises on any name/dtype/shape difference
    ref = c.reference(device_model, inputs)
    for spec in sig.outputs:
        assert ref[spec.name].shape == spec.shape and np.isfinite(ref[spec.name]).all()


def test_example_inputs_are_realistic(device_model: Any) -> None:
    from relaydiff.core.relay import encode_prompt

    inputs = get_component("unet_step").example_inputs(device_model)
    cond, uncond = encode_prompt(device_model, "a large red circle left of a small blue square", "")
    np.testing.assert_array_equal(inputs["text_embeds"], torch.cat([uncond, cond]).numpy())  # [uncond, cond]
    clean = get_component("vae_decoder").example_inputs(device_model)["latent"]
    assert not np.allclose(inputs["sample"], clean)  # noised, not the clean latent


def test_unet_step_computes_the_relay_guidance(device_model: Any) -> None:
    c = get_component("unet_step")
    x = c.example_inputs(device_model)
    got = c.reference(device_model, x)["noise_pred"]
    with torch.no_grad():
        eps = device_model.unet(
            torch.from_numpy(np.concatenate([x["sample"]] * 2)), torch.from_numpy(x["timestep"]),
            encoder_hidden_states=torch.from_numpy(x["text_embeds"]),
        ).sample.numpy()
    g = float(x["guidance_scale"][0])
    np.testing.assert_allclose(got, eps[:1] + g * (eps[1:] - eps[:1]), atol=1e-5)


def test_vae_decoder_matches_relay_decode(device_model: Any) -> None:
    from relaydiff.core.relay import decode

    latent = get_component("vae_decoder").example_inputs(device_model)["latent"]
    image = get_component("vae_decoder").reference(device_model, {"latent": latent})["image"]
    expected = decode(device_model, torch.from_numpy(latent))  # (1, H, W, 3) uint8
    got = (image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
