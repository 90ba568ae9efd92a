"""The device UNet as two graphs for feature caching, unet_step_full and unet_step_cached, against torch (ONNX, ExecuTorch)."""

from __future__ import annotations

from typing import Any

import os

import numpy as np
import pytest

from relaydiff.export import get_component, get_exporter


SLOW = pytest.mark.skipif(not os.environ.get("RELAYDIFF_SLOW"), reason="slow (UNet lowering): set RELAYDIFF_SLOW=1; device_tests cover it")


@pytest.mark.parametrize("target", ["onnx", pytest.param("executorch", marks=[pytest.mark.slow, SLOW])])
@pytest.mark.parametrize("name", ["unet_step_full", "unet_step_cached"])
def test_cache_graphs_match_torch(exported: Any, device_model: Any, target: str, name: str) -> None:
    artifact = exported(target, name, **({"write_ort": False} if target == "onnx" else {}))
    report = get_exporter(target).validate(artifact, device_model)
    assert report.max_abs_error <= 1e-3, str(report)


def test_the_full_graph_is_unet_step_and_a_cached_step_on_its_own_features_is_too(device_model: Any) -> None:
    """torch references: full = unet_step's noise prediction; cached on the same step's D = the full step."""
    step, full, cached = (get_component(n) for n in ("unet_step", "unet_step_full", "unet_step_cached"))
    inputs = step.example_inputs(device_model)
    want = step.reference(device_model, inputs)["noise_pred"]
    got = full.reference(device_model, inputs)
    np.testing.assert_allclose(got["noise_pred"], want, rtol=1e-4, atol=1e-5)
    again = cached.reference(device_model, {**inputs, "deep_features": got["deep_features"]})["noise_pred"]
    np.testing.assert_allclose(again, want, rtol=1e-4, atol=1e-5)
    sig = cached.signature(device_model)
    assert sig.inputs[-1].name == "deep_features" and sig.inputs[-1].concrete_shape == got["deep_features"].shape
