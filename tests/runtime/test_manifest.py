"""The bundle manifest record: validated by its JSON schema when read, written back as the same JSON."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from relaydiff.core.metrics import Tolerance
from relaydiff.runtime.manifest import ArtifactEntry, BundleError, Manifest

SHA = "0" * 64


def _manifest() -> dict[str, Any]:
    tensor = {"name": "sample", "dtype": "float32", "shape": [1, 4, 8, 8]}
    return {
        "format": "relaydiff-bundle", "version": 1,
        "family": {"id": "fam-0123", "config_hash": SHA, "config_files": ["vae/config.json"], "device_variant": "student",
                   "host_variant": "host"},
        "scheduler": {"sampler": "ddim", "steps": 10, "timesteps": list(range(900, -1, -100)), "config": {"beta_schedule": "linear"}},
        "latent": {"shape": [1, 4, 8, 8], "vae_scaling_factor": 0.18215, "vae_shift_factor": None, "image_shape": [1, 3, 64, 64]},
        "relay": {"relay_step": 3, "steps": 10, "device_steps": [3, 10],
                  "student": {"format": "relaydiff-student/1", "teacher": "device", "sampler": "ddim", "student_steps": 2,
                              "guidance_scale": 5.0, "relay_step": 3, "steps": 10, "step_indices": [3, 6], "timesteps": [600, 300],
                              "parametrization": "lcm", "timestep_scaling": 10.0, "sigma_data": 0.5}},
        "artifacts": [{"file": "onnx/fp32/unet_step.onnx", "sha256": SHA, "size": 10, "target": "onnx", "precision": "fp32",
                       "component": "unet_step", "method": "torch -> onnx", "compute_precision": "fp32",
                       "inputs": [tensor, {"name": "timestep", "dtype": "float32", "shape": [1]},
                                  {"name": "text_embeds", "dtype": "float32", "shape": [1, 7, 16]}],
                       "outputs": [{**tensor, "name": "noise_pred"}],
                       "extra_files": [{"file": "onnx/fp32/unet_step.ort", "sha256": SHA, "size": 3}],
                       "tolerance": {"max_abs": 0.001, "min_psnr_db": None}, "calibration": None,
                       "parity": {"run": True, "passed": True}}],
        "parity_fixtures": [{"file": "parity/unet_step.safetensors", "sha256": SHA, "size": 5, "component": "unet_step"}],
        "tools": {"torch": "2.13.0"},
        "skipped": [{"target": "coreml", "precision": "fp32", "component": "unet_step", "reason": "not asked"}],
    }


def test_round_trip_and_typed_fields() -> None:
    data = _manifest()
    m = Manifest.from_json(copy.deepcopy(data))
    assert m.to_json() == data
    art = m.artifacts[0]
    assert isinstance(art, ArtifactEntry) and art.tolerance == Tolerance(max_abs=0.001)
    assert art.runnable_files() == ["onnx/fp32/unet_step.onnx", "onnx/fp32/unet_step.ort"]
    assert art.input("guidance_scale") is None and art.input("sample") is not None
    student = m.relay.student
    assert student is not None and student.spec.parametrization == "lcm" and student.spec.sigma_data == 0.5
    assert student.step_indices == (3, 6) and m.fixture("unet_step") is not None and m.fixture("vae_decoder") is None
    assert [e.file for e in m.files()] == ["parity/unet_step.safetensors", "onnx/fp32/unet_step.onnx", "onnx/fp32/unet_step.ort"]


@pytest.mark.parametrize(("path", "value", "expect"), [
    (("format",), "other", "'other' is not one of ['relaydiff-bundle']"),
    (("relay", "relay_step"), -1, "$.relay.relay_step: -1 is less than the minimum of 0"),
    (("artifacts", 0, "sha256"), "xyz", "$.artifacts.0.sha256: 'xyz' does not match"),
    (("artifacts", 0, "target"), "tflite", "$.artifacts.0.target: 'tflite' is not one of"),
])
def test_a_bad_value_is_refused_naming_where(path: tuple[Any, ...], value: Any, expect: str) -> None:
    data = _manifest()
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(BundleError, match="is not a relaydiff bundle manifest") as exc:
        Manifest.from_json(data, where="b/manifest.json")
    assert any(expect in p for p in exc.value.problems), exc.value.problems
    assert "\n" not in str(exc.value)  # one line for the CLI; every problem is in .problems


def test_a_manifest_file_must_be_strict_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from relaydiff.runtime.manifest import read_manifest

    data = _manifest()
    (tmp_path / "manifest.json").write_text(json.dumps(data).replace('"size": 10', '"size": NaN'))
    with pytest.raises(BundleError, match="NaN is not a JSON value"):
        read_manifest(tmp_path)


def test_every_problem_is_listed() -> None:
    data = _manifest()
    del data["tools"]
    data["latent"]["shape"] = "big"
    with pytest.raises(BundleError, match=r"\(and 1 more\)") as exc:
        Manifest.from_json(data)
    assert len(exc.value.problems) == 2
