"""The bundle manifest record: validated by its JSON schema when read, written back as the same JSON."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from relaydiff.core.metrics import Tolerance
from relaydiff.runtime.manifest import LCM_EPS, ArtifactEntry, BundleError, DeviceLoop, LoopStep, Manifest, TensorEntry

SHA = "0" * 64


def _manifest() -> dict[str, Any]:
    tensor = {"name": "sample", "dtype": "float32", "shape": [1, 4, 8, 8]}
    return {
        "format": "relaydiff-bundle", "version": 2,
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
                       "parity": {"run": True, "passed": True},
                       "gates": [{"name": "per_call", "op": "<=", "bar": 0.001, "measured": 2e-06, "passed": True,
                                  "note": "on the bundle's parity fixture"},
                                 {"name": "relay_image_psnr_db", "op": ">=", "bar": 50.0, "measured": None, "passed": None,
                                  "note": "not run"}],
                       "status": "passed"}],
        "parity_fixtures": [{"file": "parity/unet_step.safetensors", "sha256": SHA, "size": 5, "component": "unet_step"}],
        "tools": {"torch": "2.13.0"},
        "skipped": [{"target": "coreml", "precision": "fp32", "component": "unet_step", "reason": "not asked"}],
        "requirements": [{"target": "onnx", "runtime": "onnxruntime", "minimum": ">= 1.31.1", "built_with": "1.31.1",
                          "delegates": ["CPUExecutionProvider"], "note": ""}],
        "tokenizer": {"folder": "tokenizer", "class": "CLIPTokenizer", "max_length": 7, "uncond_prompt": "", "input_ids_dtype": "int32",
                      "files": [{"file": "tokenizer/vocab.json", "sha256": SHA, "size": 2}]},
        "device_loop": DeviceLoop("ddim", "epsilon", tuple(range(900, -1, -100)),
                                  (LoopStep(3, 600, 0.3, 0.6, 0.1, 0.9), LoopStep(6, 300, 0.6, 0.99, 0.2, 0.8)),
                                  (TensorEntry.from_json(tensor),), cfg=False, eps_transform=LCM_EPS).to_json(),
        "safety_checker": None,  # the family has no safety checker (runtime.safety)
        "denylist": None,
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
    assert [e.file for e in m.files()] == ["parity/unet_step.safetensors", "tokenizer/vocab.json", "onnx/fp32/unet_step.onnx",
                                           "onnx/fp32/unet_step.ort"]
    assert art.status == "passed" and [g.passed for g in art.gates] == [True, None] and art.status_problem() is None
    assert m.device_loop is not None and not m.device_loop.cfg and m.device_loop.steps[1].c_out == 0.8
    assert m.tokenizer is not None and m.tokenizer.max_length == 7 and m.requirements[0].delegates == ("CPUExecutionProvider",)
    assert m.safety_checker is None and m.denylist is None and m.optimum_layout is None


def test_safety_sections_round_trip_and_list_their_files() -> None:
    data = _manifest()
    entry = {"file": "feature_extractor/preprocessor_config.json", "sha256": SHA, "size": 5}
    data["safety_checker"] = {"component": "safety_checker", "source_class": "StableDiffusionSafetyChecker", "preprocessor": entry,
                              "concepts": 17, "special_concepts": 3, "rule": "nsfw = any(concept_scores > 0)"}
    data["denylist"] = {"file": {"file": "safety/denylist.txt", "sha256": SHA, "size": 9}, "entries": 2,
                        "match": "case-insensitive, whole words"}
    m = Manifest.from_json(copy.deepcopy(data))
    assert m.to_json() == data
    assert {"feature_extractor/preprocessor_config.json", "safety/denylist.txt"} <= {e.file for e in m.files()}
    data["safety_checker"]["concepts"] = 0
    with pytest.raises(BundleError, match="concepts"):
        Manifest.from_json(data)


def test_an_old_format_version_asks_for_a_rebuild() -> None:
    data = _manifest()
    data["version"] = 1
    with pytest.raises(BundleError, match=r"format version 1; this relaydiff reads version 2: rebuild the bundle with `relaydiff bundle build`"):
        Manifest.from_json(data)


def test_gates_give_the_status() -> None:
    import math

    from relaydiff.runtime.gates import Gate, accuracy_gate, per_call_gate, status_of

    ok, bad, unrun = Gate("per_call", "<=", 1e-3, 1e-4), Gate("relay_image_psnr_db", ">=", 30.0, 17.0), Gate("per_call", "<=", 1e-3, None)
    assert (ok.passed, bad.passed, unrun.passed) == (True, False, None)
    assert status_of([ok, unrun]) == "passed" and status_of([ok, bad]) == "failed" and status_of([unrun]) == "unmeasured"
    nan = Gate("per_call", "<=", 1e-3, math.nan)
    assert nan.passed is False and Gate.from_json(nan.to_json()).passed is False  # non-finite: written as null + failed
    assert accuracy_gate(50.0, 47.5, 100).passed is False and accuracy_gate(50.0, 49.0, 100).measured == 1.0
    fig = {"run": True, "passed": True, "noise_pred": {"max_abs": 0.5, "psnr_db": 11.0}}
    assert per_call_gate("int8", Tolerance(min_psnr_db=12.0), fig).passed is False
    assert per_call_gate("fp32", Tolerance(max_abs=1e-3), {**fig, "noise_pred": {"max_abs": None, "psnr_db": None}}).passed is False
    assert per_call_gate("fp32", Tolerance(max_abs=1e-3), {"run": False, "reason": "macOS only"}).note == "macOS only"


def test_a_bad_gate_record_is_refused() -> None:
    data = _manifest()
    data["artifacts"][0]["status"] = "fine"
    with pytest.raises(BundleError, match="status"):
        Manifest.from_json(data)


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
