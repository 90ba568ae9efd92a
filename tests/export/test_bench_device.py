"""`relaydiff bench device`: one row per runnable file with torch beside it, the relay device half, and clean errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from relaydiff.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench_bundle(onnx_bundle: Path) -> Path:
    """The session's tiny ONNX bundle (tests/conftest.py): fp32 and int8, N = 10, k = 3; the benches below measure its
    unet_step and vae_decoder (``--components``), the relay device half's two artifacts."""
    return onnx_bundle


COMPONENTS = ["--components", "unet_step,vae_decoder"]


def _copy_with(bundle: Path, tmp_path: Path, edit: Any) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_json_report(bench_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "device", "--bundle", str(bench_bundle), "--json", "--repeats", "3", "--warmup", "1", *COMPONENTS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"] == ["unet_step", "vae_decoder"]  # the bundle's text encoder and cached-step pair are left out
    files = {r["file"] for r in report["artifacts"]}
    assert files == {f"onnx/{p}/{c}{s}" for p, c in (("fp32", "unet_step"), ("fp32", "vae_decoder"),
                                                     ("int8", "unet_step.int8-static"), ("int8", "vae_decoder.int8-dynamic"))
                     for s in (".onnx", ".ort")}
    for r in report["artifacts"]:
        assert r["status"] == "ok" and r["size"] == (bench_bundle / r["file"]).stat().st_size
        assert r["load_seconds"] > 0 and r["call_seconds"] > 0 and r["torch_call_seconds"] > 0
        assert r["ratio_vs_torch"] == pytest.approx(r["call_seconds"] / r["torch_call_seconds"], rel=1e-2, abs=1e-3)  # both rounded in the report
    assert {t["component"] for t in report["torch"]} == {"unet_step", "vae_decoder"}
    relay = {(r["target"], r["precision"]): r for r in report["relay"]}
    assert set(relay) == {("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")}
    assert all(r["seconds"] > 0 and r["device_steps"] == [3, 10] for r in relay.values())
    assert report["family"] is not None and len(report["notes"]) == 1 and report["notes"][0].startswith("peak RSS")
    for r in report["artifacts"]:  # each file loaded and called in a fresh process: its peak RSS rose by something
        assert "rss_error" not in r, r.get("rss_error")
        assert 0 < r["rss_rise_bytes"] <= r["peak_rss_bytes"] and r["rss_rise_over_size"] == pytest.approx(r["rss_rise_bytes"] / r["size"], rel=1e-2)
        if r["precision"] == "int8":
            twin = next(f for f in report["artifacts"] if f["precision"] == "fp32" and f["component"] == r["component"]
                        and f["file"].endswith(".ort") == r["file"].endswith(".ort"))
            assert r["fp32_size_over_int8"] == pytest.approx(twin["size"] / r["size"], rel=1e-2)
            assert r["call_vs_fp32"] == pytest.approx(r["call_seconds"] / twin["call_seconds"], rel=1e-2, abs=1e-3)
    assert all(t["rss_rise_bytes"] > 0 for t in report["torch"])


def test_table(bench_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "device", "--bundle", str(bench_bundle), "--repeats", "1", "--warmup", "0", "--no-memory", *COMPONENTS]) == 0
    out = capsys.readouterr().out
    assert "call ms" in out and "torch ms" in out and "onnx/int8/unet_step.int8-static.ort" in out
    assert "device half of a relay (steps [3, 10) + decode)" in out and "onnx/int8" in out


@pytest.mark.skipif(sys.platform == "darwin", reason="CoreML runs on macOS")
def test_coreml_is_reported_skipped(bench_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def add_coreml(m: dict[str, Any]) -> None:
        first = next(a for a in m["artifacts"] if a["component"] == "unet_step")
        fake = dict(first, target="coreml", file=first["file"], extra_files=[])
        m["artifacts"].append(fake)

    folder = _copy_with(bench_bundle, tmp_path, add_coreml)
    assert main(["bench", "device", "--bundle", str(folder), "--json", "--repeats", "1", "--no-relay", "--no-memory", *COMPONENTS]) == 0
    rows = json.loads(capsys.readouterr().out)["artifacts"]
    coreml = [r for r in rows if r["target"] == "coreml"]
    assert len(coreml) == 1 and coreml[0]["status"] == "skipped: runtime needs macOS" and "call_seconds" not in coreml[0]


def test_without_the_family_there_is_no_torch_column(bench_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy_with(bench_bundle, tmp_path, lambda m: m["family"].update(config_hash="0" * 64))
    assert main(["bench", "device", "--bundle", str(folder), "--json", "--repeats", "1", "--no-memory", *COMPONENTS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] is None and report["torch"] == [] and report["relay"] == []
    assert all("ratio_vs_torch" not in r and r["call_seconds"] > 0 for r in report["artifacts"])
    assert any("pass --family" in n for n in report["notes"])


def test_a_family_that_is_not_the_bundles_is_refused(bench_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other").mkdir()
    assert main(["bench", "device", "--bundle", str(bench_bundle), "--family", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "has config hash" in err and "the bundle was built from" in err and "Traceback" not in err


def test_a_component_the_bundle_lacks_is_named(bench_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "device", "--bundle", str(bench_bundle), "--components", "unet_step,vae"]) == 2
    err = capsys.readouterr().err
    assert "the bundle has no 'vae' artifact; it has: text_encoder, unet_step" in err and "Traceback" not in err
