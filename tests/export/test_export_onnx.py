"""ONNX: every component exported with fixed shapes, optimised for onnxruntime, converted to .ort, and within tolerance of torch."""

from __future__ import annotations

from typing import Any

import pytest

from relaydiff.export import get_exporter

COMPONENTS = ["unet_step", "unet", "vae_decoder", "text_encoder"]


@pytest.mark.parametrize("name", COMPONENTS)
def test_onnx_export_matches_torch(exported: Any, device_model: Any, name: str) -> None:
    artifact = exported("onnx", name)
    report = get_exporter("onnx").validate(artifact, device_model)
    assert report.max_abs_error <= 1e-3, str(report)
    assert {c.where for c in report.checks} == {"onnx", "optimized", "ort"}, str(report)
    print(report)


@pytest.mark.parametrize("name", ["unet_step", "text_encoder"])
def test_ort_file_is_written_and_loads_in_onnxruntime(exported: Any, name: str) -> None:
    import onnxruntime as ort

    artifact = exported("onnx", name)
    ort_path = artifact.files["ort"]
    assert ort_path.suffix == ".ort" and ort_path.stat().st_size > 0
    assert artifact.files["ort_config"].is_file()  # operator list for a reduced ORT Mobile build
    session = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [s.name for s in artifact.signature.inputs]


def test_onnx_file_carries_relaydiff_metadata(exported: Any, device_model: Any) -> None:
    import onnx

    artifact = exported("onnx", "unet_step")
    props = {p.key: p.value for p in onnx.load(str(artifact.path)).metadata_props}
    assert props["relaydiff.component"] == "unet_step"
    assert props["relaydiff.family_id"] == device_model.family_id
    assert artifact.metadata_path.is_file()


def test_text_encoder_uses_optimum_and_the_unet_step_torch_dynamo(exported: Any) -> None:
    assert exported("onnx", "text_encoder").metadata["exported_with"].startswith("optimum.exporters.onnx")
    assert exported("onnx", "unet_step").metadata["exported_with"].startswith("torch.onnx.export(dynamo=True")
