"""Invalid names, options and inputs fail clearly; perturbed artifacts and references fail validation (the check can fail)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relaydiff.export import (
    Artifact,
    InputSpecError,
    UnknownNameError,
    ValidationError,
    get_component,
    get_exporter,
    list_exporters,
)


def test_unknown_exporter_lists_the_known_ones() -> None:
    assert list_exporters() == ["coreml", "executorch", "onnx"]
    with pytest.raises(UnknownNameError, match=r"unknown exporter 'tflite'; expected one of: coreml, executorch, onnx"):
        get_exporter("tflite")


def test_unknown_component_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"'unet_xl'.*text_encoder, unet, unet_step, unet_step_cached, unet_step_full, vae_decoder"):
        get_component("unet_xl")


def test_unknown_and_bad_exporter_options() -> None:
    with pytest.raises(TypeError, match="accepts: target, compute_precision, compute_units"):
        get_exporter("coreml", tagret="iOS18")
    with pytest.raises(ValueError, match="'iOS16'"):
        get_exporter("coreml", target="iOS16")
    with pytest.raises(ValueError, match="'vulkan'"):
        get_exporter("executorch", backend="vulkan")
    with pytest.raises(ValueError, match="opset must be an integer >= 18.*got '18'"):
        get_exporter("onnx", opset="18")


def test_unknown_precision_lists_the_declared_ones() -> None:
    with pytest.raises(UnknownNameError, match="'int4'.*fp16, fp32"):
        get_component("unet_step").tolerance("int4")


def test_inputs_are_checked_before_running(exported: Any, device_model: Any) -> None:
    artifact = exported("onnx", "text_encoder")
    good = get_component("text_encoder").example_inputs(device_model)
    exporter = get_exporter("onnx")
    with pytest.raises(InputSpecError, match=r"dtype int64, expected int32.*accepts input_ids: int32\[1, 16\]"):
        exporter.run(artifact, {"input_ids": good["input_ids"].astype(np.int64)})
    with pytest.raises(InputSpecError, match=r"shape \(1, 8\), expected \(1, 16\)"):
        exporter.run(artifact, {"input_ids": good["input_ids"][:, :8]})
    with pytest.raises(InputSpecError, match="unexpected input 'ids'; missing input 'input_ids'"):
        exporter.run(artifact, {"ids": good["input_ids"]})


def test_perturbed_reference_fails_with_every_mismatch(exported: Any, device_model: Any) -> None:
    artifact = exported("onnx", "vae_decoder")
    c = get_component("vae_decoder")
    inputs = c.example_inputs(device_model)
    ref = c.reference(device_model, inputs)
    ref["image"] = ref["image"] + 0.01
    with pytest.raises(ValidationError) as info:
        get_exporter("onnx").validate(artifact, device_model, inputs, reference=ref)
    kinds = [(m.where, m.kind) for m in info.value.mismatches]
    assert kinds == [("onnx", "tolerance"), ("optimized", "tolerance"), ("ort", "tolerance")], str(info.value)
    assert "max abs error 0.01" in str(info.value) and "(1, 3, 16, 16)" in str(info.value)


def test_reference_of_the_wrong_shape_is_a_shape_mismatch(exported: Any, device_model: Any) -> None:
    artifact = exported("onnx", "vae_decoder")
    inputs = get_component("vae_decoder").example_inputs(device_model)
    with pytest.raises(ValidationError, match="shape"):
        get_exporter("onnx").validate(artifact, device_model, inputs, reference={"image": np.zeros((1, 3, 8, 8), np.float32)})


def test_perturbed_weights_fail_validation(exported: Any, device_model: Any, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    artifact = exported("onnx", "vae_decoder")
    proto = onnx.load(str(artifact.path))
    big = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) + np.float32(0.05), big.name))
    bad_path = tmp_path / "vae_decoder.onnx"
    onnx.save(proto, str(bad_path))
    bad = dataclasses.replace(artifact, files={"onnx": bad_path}, runnable=("onnx",))
    with pytest.raises(ValidationError) as info:
        get_exporter("onnx").validate(bad, device_model)
    assert [m.kind for m in info.value.mismatches] == ["tolerance"], str(info.value)


def test_declared_signature_that_the_file_lacks_fails_the_spec_check(exported: Any) -> None:
    artifact = exported("onnx", "text_encoder")
    sig = artifact.signature
    renamed = dataclasses.replace(sig, outputs=(dataclasses.replace(sig.outputs[0], name="hidden"),))
    with pytest.raises(ValidationError) as info:
        get_exporter("onnx").check_spec(dataclasses.replace(artifact, signature=renamed))
    kinds = {(m.tensor, m.kind) for m in info.value.mismatches}
    assert ("hidden", "missing") in kinds and ("last_hidden_state", "unexpected") in kinds, str(info.value)


def test_artifact_metadata_round_trips_and_revalidates(exported: Any, device_model: Any, tmp_path: Path) -> None:
    artifact = exported("onnx", "text_encoder")
    moved = tmp_path / "moved"
    shutil.copytree(artifact.path.parent, moved)
    again = Artifact.read(moved / artifact.metadata_path.name)
    assert again.signature == artifact.signature and again.files["ort"] == moved / "text_encoder.ort"
    get_exporter("onnx").validate(again, device_model)
