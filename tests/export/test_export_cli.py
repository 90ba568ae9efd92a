"""``relaydiff export``: main(argv) -> int exports and validates; bad options exit non-zero with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaydiff.cli import main


def test_cli_exports_and_validates(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "--family", str(tiny_family), "--exporter", "onnx", "--component", "text_encoder",
               "--option", "write_ort=false", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "text_encoder.onnx").is_file() and not (tmp_path / "text_encoder.ort").exists()
    assert "max abs" in out


def test_cli_rejects_unknown_options(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--family", str(tiny_family), "--exporter", "onnx", "--option", "opset_version=18", "--out", str(tmp_path)]) == 2
    assert "accepts: opset, optimization, write_ort, use_optimum" in capsys.readouterr().err
