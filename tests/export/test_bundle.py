"""Bundles: build (ONNX fp32 + INT8, CoreML int8) writes artifacts, manifest and zip; verify passes and catches tampering."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from relaydiff.export.bundle import BundleConfig, build
from relaydiff.runtime.bundle import schema_problems, verify

SLOW = pytest.mark.skipif(not os.environ.get("RELAYDIFF_SLOW"), reason="slow (ExecuTorch lowering): set RELAYDIFF_SLOW=1")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: one thread is ~50x faster than two contending
    yield
    torch.set_num_threads(before)


def _cli(argv: list[str]) -> int:
    """The bundle command as relaydiff.cli dispatches it, without the CLI's error handling (errors raise)."""
    from relaydiff.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


CALIBRATION_PROMPTS = ["a red circle", "# a comment line is skipped", "", "two blue squares on a green field", "a yellow triangle"]


@pytest.fixture(scope="module")
def bundle(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("bundle")
    prompts = base / "prompts.txt"
    prompts.write_text("\n".join(CALIBRATION_PROMPTS) + "\n")
    out = base / "tiny-bundle"
    rc = _cli(["bundle", "build", "--family", str(tiny_family), "--targets", "onnx,coreml", "--precision", "fp32,int8",
               "--relay-step", "3", "--steps", "10", "--calibration-prompts", str(prompts), "--calibration-sampler", "ddim",
               "--calibration-guidance", "4", "--out", str(out), "--json"])
    assert rc == 0
    return out


@pytest.fixture()
def copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_build_writes_artifacts_manifest_and_zip(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert schema_problems(manifest) == []
    got = {(a["target"], a["precision"], a["component"]) for a in manifest["artifacts"]}
    for t in ("onnx", "coreml"):
        for p in ("fp32", "int8"):
            for c in ("unet_step", "vae_decoder", "text_encoder"):
                assert (t, p, c) in got
    assert manifest["relay"] == {"relay_step": 3, "steps": 10, "device_steps": [3, 10]}
    assert len(manifest["scheduler"]["timesteps"]) == 10 and manifest["latent"]["shape"] == [1, 4, 8, 8]
    assert {"torch", "onnxruntime", "coremltools", "executorch", "relaydiff"} <= set(manifest["tools"])
    unet8 = next(a for a in manifest["artifacts"] if a["target"] == "onnx" and a["precision"] == "int8" and a["component"] == "unet_step")
    assert unet8["calibration"]["step_range"] == [3, 10]
    assert unet8["parity"]["passed"] and unet8["parity"]["relay"]["image_psnr_db"] >= 30.0, unet8["parity"]
    coreml8 = next(a for a in manifest["artifacts"] if a["target"] == "coreml" and a["precision"] == "int8" and a["component"] == "unet_step")
    assert coreml8["parity"]["compression_ops"]
    assert not bundle.with_suffix(".zip").exists()  # the zip goes inside --out, not beside it
    with zipfile.ZipFile(bundle / "tiny-bundle.zip") as z:
        names = set(z.namelist())
        assert "manifest.json" in names and "tokenizer/vocab.json" in names and not any(n.endswith(".zip") for n in names)
        assert z.read("manifest.json") == (bundle / "manifest.json").read_bytes()


def test_verify_passes(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify(bundle)
    assert report.ok, report.problems
    ran = [r for r in report.parity if r.get("run")]
    assert {r["target"] for r in ran} == {"onnx"} and all(r["passed"] for r in ran)
    assert _cli(["bundle", "verify", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_tampered_artifact_is_named(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy / "onnx" / "int8" / "unet_step.int8-static.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _cli(["bundle", "verify", str(copy)]) == 1
    assert "onnx/int8/unet_step.int8-static.onnx: sha256" in capsys.readouterr().err


def test_tampered_mlpackage_is_named(copy: Path) -> None:
    weights = next((copy / "coreml" / "int8").rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    problems = verify(copy).problems
    assert any(p.startswith("coreml/int8/") and "size" in p for p in problems), problems


def test_tampered_manifest_is_named(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["relay"]["relay_step"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(copy).problems
    assert any(p.startswith("manifest.json: content does not match") for p in problems), problems


def test_manifest_escaping_the_folder_is_refused(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"][0]["file"] = "onnx/../../outside.onnx"
    text = json.dumps(manifest)
    (copy / "manifest.json").write_text(text)
    (copy / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")
    problems = verify(copy).problems
    assert any("onnx/../../outside.onnx: path leaves the bundle folder" in p for p in problems), problems


def test_unlisted_file_and_oversized_manifest(copy: Path) -> None:
    from relaydiff.runtime.bundle import MAX_MANIFEST_BYTES, BundleError

    (copy / "onnx" / "extra.py").write_text("print('hi')\n")
    assert any(p == "onnx/extra.py: not listed in the manifest" for p in verify(copy).problems)
    (copy / "manifest.json").write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(BundleError, match="the cap is"):
        verify(copy)


def test_schema_rejects_bad_manifests() -> None:
    assert any("'format' is a required property" in p or "format" in p for p in schema_problems({"version": 1}))
    bad = {"format": "relaydiff-bundle", "version": 3}
    assert any("version" in p for p in schema_problems(bad))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--targets", "tflite"], "unknown target 'tflite'; expected one of: onnx, coreml, executorch"),
        (["--precision", "fp8"], "unknown precision 'fp8'; expected one of: fp32, int8"),
        (["--components", "unet_step,vae"], "unknown component 'vae'"),
        (["--denylist", "/nonexistent/deny.txt"], "denylist '/nonexistent/deny.txt' is not a file; expected a text file"),
        (["--components", "unet_step,vae_decoder,safety_checker"], "component 'safety_checker': the family has no safety checker"),
        (["--targets", "executorch", "--precision", "int8", "--executorch-float", "unet.up_blocks.-1,unet.conv_outt"],
         r"--executorch-float: no module 'unet.conv_outt' in the device UNet step; expected paths like 'unet.up_blocks.-1'"),
    ],
)
def test_bad_names_list_the_known_ones(tiny_family: Path, tmp_path: Path, argv: list[str], match: str) -> None:
    from relaydiff.core.errors import RelaydiffError

    with pytest.raises(RelaydiffError, match=match):
        _cli(["bundle", "build", "--family", str(tiny_family), "--out", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()


def test_non_empty_out_is_refused(tiny_family: Path, tmp_path: Path) -> None:
    from relaydiff.runtime.bundle import BundleError

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        build(BundleConfig(family=tiny_family, out=tmp_path))


@pytest.mark.slow
@SLOW
def test_executorch_bundle(tiny_family: Path, tmp_path: Path) -> None:
    out = tmp_path / "et"
    manifest = build(BundleConfig(family=tiny_family, out=out, targets=("executorch",), precisions=("fp32", "int8"),
                                  components=("vae_decoder", "text_encoder"), relay_step=3, steps=10), progress=False)
    got = {(a["precision"], a["component"]) for a in manifest["artifacts"]}
    assert got == {(p, c) for p in ("fp32", "int8") for c in ("vae_decoder", "text_encoder")}
    assert manifest["skipped"] == []
    report = verify(out)
    assert report.ok and all(r["passed"] for r in report.parity), report.to_json()


def test_the_manifest_reads_back_as_typed_records(bundle: Path) -> None:
    from relaydiff.runtime.manifest import Manifest

    raw = json.loads((bundle / "manifest.json").read_text())
    manifest = Manifest.read(bundle)
    assert manifest.to_json() == raw  # one record, read and written in one place
    onnx8 = manifest.artifacts_for("onnx", "int8")
    assert set(onnx8) == {"unet_step", "vae_decoder", "text_encoder"}
    assert onnx8["unet_step"].input("guidance_scale") is not None and onnx8["unet_step"].runnable_files()[1].endswith(".ort")
    assert manifest.relay.device_steps == (3, 10) and manifest.relay.student is None


def test_the_bundles_json_is_plain_json_without_build_paths(bundle: Path, tiny_family: Path) -> None:
    """Every JSON file of the bundle parses as strict JSON and names no absolute path of the machine that built it."""
    def strict(value: str) -> None:
        raise ValueError(f"not JSON: {value}")

    texts = {p: p.read_text() for p in bundle.rglob("*.json")}
    assert len(texts) > 3
    for path, text in texts.items():
        json.loads(text, parse_constant=strict)  # NaN / Infinity are not JSON
        assert str(tiny_family) not in text and str(bundle) not in text and str(Path.home()) + "/" not in text, path
    from relaydiff.runtime.bundle import find_family
    from relaydiff.runtime.manifest import Manifest

    assert find_family(bundle, Manifest.read(bundle)) == tiny_family.resolve()  # the relative hint still finds the family


def _rewrite(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest)
    (folder / "manifest.json").write_text(text)
    (folder / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")


ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:tmp|home|root|work|Users|var|private|opt|mnt)/")


def test_no_absolute_path_in_any_text_file_of_the_bundle(bundle: Path, tiny_family: Path) -> None:
    """Every file of the built bundle that is text (JSON, the .ort operator configs, the tokenizer, the CoreML package
    manifest) names no absolute path: not the family's, the bundle's, the home folder, nor any /tmp/... path."""
    scanned = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.suffix != ".zip"):
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (ONNX, .ort flatbuffers, safetensors, CoreML weights)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        scanned.append(path.relative_to(bundle).as_posix())
        for bad in (str(tiny_family.resolve()), str(bundle.resolve()), str(Path.home()) + "/"):
            assert bad not in text, f"{path}: names {bad}"
        assert not ABSOLUTE.search(text), f"{path}: {ABSOLUTE.search(text).group(0)}... in {text[max(0, ABSOLUTE.search(text).start() - 60):][:120]!r}"
    kinds = {Path(f).suffix for f in scanned}
    assert {".json", ".config", ".txt"} <= kinds, sorted(scanned)  # the operator configs and the tokenizer were scanned
    assert any(f.endswith(".required_operators.config") for f in scanned)


def test_gates_are_recorded_per_artifact(bundle: Path) -> None:
    from relaydiff.runtime.gates import RELAY_IMAGE_PSNR_DB
    from relaydiff.runtime.manifest import Manifest

    m = Manifest.read(bundle)
    by = {a.name: a for a in m.artifacts}
    assert {a.status for a in m.artifacts if a.target == "onnx"} == {"passed"}
    assert {a.status for a in m.artifacts if a.target == "coreml"} == {"unmeasured"}  # no CoreML runtime off macOS
    unet8 = {g.name: g for g in by["onnx/int8/unet_step"].gates}
    assert set(unet8) == {"per_call", "relay_image_psnr_db", "prompt_accuracy_points"}
    assert unet8["relay_image_psnr_db"].bar == RELAY_IMAGE_PSNR_DB["int8"] and unet8["relay_image_psnr_db"].passed
    assert unet8["prompt_accuracy_points"].measured is None and "random weights" in unet8["prompt_accuracy_points"].note
    assert {g.name for g in by["onnx/fp32/unet_step"].gates} == {"per_call", "relay_image_psnr_db"}
    assert [g.name for g in by["onnx/int8/vae_decoder"].gates] == ["per_call"]
    cal = by["onnx/int8/unet_step"].calibration or {}
    assert cal["config"]["prompt_source"] == "list" and cal["config"]["prompts"] == 3, cal["config"]  # the file's 3 prompts
    assert cal["config"]["guidance_scale"] == 4.0 and cal["config"]["sampler"] == "ddim"


def test_the_mobile_package_sections(bundle: Path) -> None:
    from relaydiff.runtime.manifest import Manifest

    m = Manifest.read(bundle)
    assert m.tokenizer is not None and m.tokenizer.tokenizer_class == "CLIPTokenizer"
    assert {f.file for f in m.tokenizer.files} >= {"tokenizer/vocab.json", "tokenizer/tokenizer_config.json"}
    loop = m.device_loop
    assert loop is not None and loop.cfg and loop.timesteps == m.scheduler.timesteps
    assert [s.index for s in loop.steps] == list(range(10)) and [s.timestep for s in loop.steps] == list(loop.timesteps)
    assert all(0 < s.alpha_cumprod < s.alpha_cumprod_prev <= 1 for s in loop.steps)  # the noise level falls every step
    assert [t.name for t in loop.inputs] == ["sample", "timestep", "text_embeds", "guidance_scale"]
    assert {(r.target, r.runtime) for r in m.requirements} == {("onnx", "onnxruntime"), ("coreml", "coreml")}
    assert all(r.minimum and r.built_with for r in m.requirements)


def test_an_old_bundle_asks_for_a_rebuild(copy: Path) -> None:
    from relaydiff.runtime.bundle import BundleError
    from relaydiff.runtime.manifest import Manifest

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = 1
    _rewrite(copy, manifest)
    with pytest.raises(BundleError, match=r"format version 1; this relaydiff reads version 2: rebuild the bundle"):
        verify(copy)
    with pytest.raises(BundleError, match="rebuild the bundle"):
        Manifest.read(copy)


def test_a_status_that_disagrees_with_its_gates_is_a_problem(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"][0]["gates"][0]["measured"] = 1e9  # a failing figure under a 'passed' status
    manifest["artifacts"][0]["gates"][0]["passed"] = False
    _rewrite(copy, manifest)
    problems = verify(copy, parity=False).problems
    assert any("status 'passed' but its gates give 'failed'" in p for p in problems), problems


def test_a_foreign_zip_inside_the_bundle_is_a_problem(copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    shutil.make_archive(str(tmp_path / "b"), "zip", root_dir=other)
    shutil.copy(tmp_path / "b.zip", copy / "b.zip")
    assert any(p.startswith("b.zip: its manifest.json differs") for p in verify(copy, parity=False).problems)


def _fail_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every fp32 artifact miss its per-call bar (0: no error at all is allowed), as a real regression would."""
    monkeypatch.setattr("relaydiff.runtime.gates.FP32_MAX_ABS", 0.0)


def test_a_failing_artifact_fails_the_build_and_leaves_nothing(tiny_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from relaydiff.cli import main

    _fail_fp32(monkeypatch)
    out = tmp_path / "failing"
    rc = main(["bundle", "build", "--family", str(tiny_family), "--targets", "onnx", "--precision", "fp32",
               "--components", "vae_decoder", "--relay-step", "3", "--steps", "10", "--out", str(out), "--no-zip"])
    err = capsys.readouterr().err
    assert rc == 1 and "artifacts failed their gates" in err and "onnx/fp32/vae_decoder: per_call" in err, err
    assert not out.exists()


def test_allow_failing_marks_the_artifact_and_the_runtime_refuses_it(tiny_family: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.bundle import FailedArtifactError
    from relaydiff.runtime.manifest import Manifest

    _fail_fp32(monkeypatch)
    out = tmp_path / "kept"
    rc = _cli(["bundle", "build", "--family", str(tiny_family), "--targets", "onnx", "--precision", "fp32",
               "--components", "unet_step,vae_decoder", "--relay-step", "3", "--steps", "10", "--calibration-prompts", "2",
               "--out", str(out), "--no-zip", "--allow-failing"])
    assert rc == 0
    m = Manifest.read(out)
    assert {a.status for a in m.artifacts} == {"failed"}
    assert all(a.failed_gates()[0].name == "per_call" for a in m.artifacts)
    with pytest.raises(FailedArtifactError, match=r"artifact onnx/fp32/unet_step .* failed its build gates \(per_call: .*bar <= 0"):
        create_backend("onnx", bundle_dir=out, precision="fp32")
    capsys.readouterr()
    assert _cli(["bundle", "verify", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["gates_ok"] is False  # intact, but its artifacts failed their gates
    assert sorted(report["failed_artifacts"]) == ["onnx/fp32/unet_step", "onnx/fp32/vae_decoder"]
    assert {row["artifact"]: row["status"] for row in report["gates"]} == {"onnx/fp32/unet_step": "failed", "onnx/fp32/vae_decoder": "failed"}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--calibration-prompts", "missing.txt"], r"--calibration-prompts: 'missing.txt' is neither a number of world prompts nor a file"),
        (["--calibration-prompts", "0"], r"--calibration-prompts: '0' must be a positive number"),
        (["--calibration-prompts", "EMPTY"], r"holds no prompts"),
        (["--calibration-sampler", "plms2"], r"unknown calibration sampler 'plms2'; expected one of: ddim, euler"),
        (["--calibration-guidance", "0.5"], r"calibration guidance must be a finite number > 1"),
        (["--calibration-guidance", "nan"], r"calibration guidance must be a finite number > 1"),
    ],
)
def test_bad_calibration_options_are_named(tiny_family: Path, tmp_path: Path, argv: list[str], match: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from relaydiff.core.errors import RelaydiffError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").write_text("# only a comment\n\n")
    with pytest.raises(RelaydiffError, match=match):
        _cli(["bundle", "build", "--family", str(tiny_family), "--out", str(tmp_path / "x"), *argv])
    assert not (tmp_path / "x").exists()
