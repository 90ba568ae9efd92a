"""Fixtures of the quantization tests: one torch thread (the tiny models run ~50x faster than with two
threads contending on shared cores), a fp32 ONNX unet_step and small relay-aware/whole calibration sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

STEPS, K = 10, 3  # short trajectories keep the tests fast; the device runs [K, STEPS)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def calibration_sets(tiny_pair: Any) -> dict[str, Any]:
    from relaydiff.quantize.calibration import CalibrationConfig, capture

    host, device = tiny_pair
    return {
        mode: capture(host, device, CalibrationConfig(mode=mode, relay_steps=(K,), steps=STEPS, prompts=3))
        for mode in ("relay", "whole")
    }


@pytest.fixture(scope="session")
def fp32_onnx(tiny_pair: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """fp32 ONNX artifacts (no .ort) of unet_step and vae_decoder, exported once."""
    from relaydiff.export import get_component, get_exporter

    out: Path = tmp_path_factory.mktemp("onnx-fp32")
    ex = get_exporter("onnx", write_ort=False)
    return {c: ex.export(get_component(c), tiny_pair[1], out) for c in ("unet_step", "vae_decoder")}
