"""Bundles: build (ONNX fp32 + INT8, CoreML int8) writes artifacts, manifest and zip; verify passes and catches tampering."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def bundle(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    rc = _cli(["bundle", "build", "--family", str(tiny_family), "--targets", "onnx,coreml", "--precision", "fp32,int8",
               "--relay-step", "3", "--steps", "10", "--calibration-prompts", "3", "--out", str(out), "--json"])
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
    with zipfile.ZipFile(bundle.with_suffix(".zip")) as z:
        assert "manifest.json" in z.namelist()


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
    import hashlib

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
    bad = {"format": "relaydiff-bundle", "version": 2}
    assert any("version" in p for p in schema_problems(bad))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--targets", "tflite"], "unknown target 'tflite'; expected one of: onnx, coreml, executorch"),
        (["--precision", "fp8"], "unknown precision 'fp8'; expected one of: fp32, int8"),
        (["--components", "unet_step,vae"], "unknown component 'vae'"),
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
