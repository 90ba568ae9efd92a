"""ONNX INT8: static QDQ (relay-aware and whole-trajectory calibration) and dynamic, checked on held-out relays.

Bounds are what was measured on the tiny random preset (N=10, k=3) with margin; the last test shows the
same checks fail for a broken denoiser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relaydiff.quantize.onnx_int8 import OnnxInt8Config, quantize_onnx, quantized_op_counts, session_runner
from relaydiff.quantize.parity import RelayParity, eval_config, relay_parity

K, STEPS = 3, 10  # as in conftest.py
MIN_IMAGE_PSNR = 30.0  # the bar for the final image (fp32 decoder)
MIN_DENOISER_PSNR = 12.0  # worst single unet_step call


@pytest.fixture(scope="module")
def int8(fp32_onnx: Any, calibration_sets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("int8")
    return {
        "relay": quantize_onnx(fp32_onnx["unet_step"], out / "relay", OnnxInt8Config(), calibration_sets["relay"]),
        "whole": quantize_onnx(fp32_onnx["unet_step"], out / "whole", OnnxInt8Config(), calibration_sets["whole"]),
        "dynamic": quantize_onnx(fp32_onnx["unet_step"], out / "dynamic", OnnxInt8Config(method="dynamic")),
    }


@pytest.fixture(scope="module")
def parities(int8: dict[str, Any], tiny_pair: Any) -> dict[str, RelayParity]:
    host, device = tiny_pair
    cfg = eval_config(K, STEPS, prompts=2)
    return {name: relay_parity(host, device, session_runner(a.path), config=cfg) for name, a in int8.items()}


def test_int8_models_are_quantized_and_load(int8: dict[str, Any], fp32_onnx: Any) -> None:
    import onnx

    for name, a in int8.items():
        onnx.checker.check_model(onnx.load(str(a.path)))
        ops = quantized_op_counts(a.path)
        assert ops, name
        assert a.precision == "int8" and a.metadata["int8_size"] < a.metadata["fp32_size"], (name, a.metadata)
    assert quantized_op_counts(fp32_onnx["unet_step"].path) == {}
    assert "MatMulInteger" in quantized_op_counts(int8["dynamic"].path)
    assert int8["relay"].metadata["calibration"]["step_range"] == [K, STEPS]


@pytest.mark.parametrize("name", ["relay", "whole", "dynamic"])
def test_int8_relay_parity_is_within_bounds(parities: dict[str, RelayParity], name: str) -> None:
    p = parities[name]
    print(name, p.to_json())
    assert p.image_psnr_db >= MIN_IMAGE_PSNR, p
    assert p.denoiser_psnr_db >= MIN_DENOISER_PSNR, p
    assert 0 < p.denoiser_max_abs < 1.5, p


def test_int8_validates_through_the_onnx_exporter(int8: dict[str, Any], tiny_pair: Any, calibration_sets: Any) -> None:
    """The ordinary exporter runs and validates the int8 artifact against torch, with the int8 bar."""
    from relaydiff.export import get_exporter

    x = calibration_sets["relay"].for_component("unet_step")[0]
    report = get_exporter("onnx").validate(int8["relay"], tiny_pair[1], x)
    assert report.checks[0].psnr_db >= int8["relay"].tolerance.min_psnr_db


def test_the_bounds_can_fail(tiny_pair: Any, int8: dict[str, Any]) -> None:
    """A denoiser that is off by 10% of its output fails the same bounds."""
    host, device = tiny_pair
    run = session_runner(int8["relay"].path)

    def broken(x: Any) -> dict[str, np.ndarray]:
        y = run(x)["noise_pred"]
        return {"noise_pred": y * 1.1 + 0.5}

    p = relay_parity(host, device, broken, config=eval_config(K, STEPS, prompts=1))
    assert p.image_psnr_db < MIN_IMAGE_PSNR or p.denoiser_psnr_db < MIN_DENOISER_PSNR, p


def test_static_needs_calibration(fp32_onnx: Any, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="calibration set"):
        quantize_onnx(fp32_onnx["unet_step"], tmp_path, OnnxInt8Config())
    with pytest.raises(ValueError, match="'fp8'"):
        OnnxInt8Config(method="fp8")


def test_calibration_comparison_covers_both_schemes_and_sets(tiny_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """relaydiff quantize compare: W8A16 and W8A8, relay-aware and whole-trajectory sets of equal prompts."""
    import json as _json

    from relaydiff.cli import main

    assert main(["quantize", "compare", "--family", str(tiny_family), "--relay-step", "3", "--steps", "6", "--prompts", "1", "--eval-prompts", "1", "--json"]) == 0
    report = _json.loads(capsys.readouterr().out)
    got = {(r["scheme"], r["calibration"]): r for r in report["rows"]}
    assert set(got) == {("w8a16", "relay"), ("w8a16", "whole"), ("w8a8", "relay"), ("w8a8", "whole")}
    assert got[("w8a16", "relay")]["samples"] == 3 and got[("w8a16", "whole")]["samples"] == 6  # device steps [3, 6) vs [0, 6)
    for r in report["rows"]:
        assert r["image_psnr_db"] > 0 and r["denoiser_max_abs"] >= 0 and r["bytes"] < report["fp32_bytes"]
    assert main(["quantize", "compare", "--family", str(tiny_family / "nope")]) == 2
