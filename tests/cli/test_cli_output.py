"""Machine-readable output: under --json stdout is one JSON document; library chatter lands in a named log file;
``import relaydiff`` prints nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relaydiff.cli import main

RELAYDIFF = [sys.executable, "-m", "relaydiff"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "RELAYDIFF_LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}


def test_import_prints_nothing() -> None:
    code = ("import relaydiff, relaydiff.cli, relaydiff.core.family, relaydiff.core.relay, relaydiff.export, "
            "relaydiff.quantize, relaydiff.runtime, relaydiff.host")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_bundle_build_json_is_one_document_piped(tiny_family: Path, tmp_path: Path) -> None:
    """`relaydiff bundle build --json ... | python -c "import json,sys; json.load(sys.stdin)"`."""
    out = tmp_path / "bundle"
    cmd = [*RELAYDIFF, "bundle", "build", "--json", "--family", str(tiny_family), "--components", "vae_decoder",
           "--steps", "4", "--relay-step", "2", "--calibration-prompts", "1", "--no-zip", "--out", str(out)]
    build = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    reader = subprocess.run([sys.executable, "-c", "import json,sys; d = json.load(sys.stdin); print(d['format'])"],
                            stdin=build.stdout, capture_output=True, text=True, timeout=600)
    build.stdout.close()  # type: ignore[union-attr]
    err = build.stderr.read().decode()  # type: ignore[union-attr]
    assert build.wait(timeout=600) == 0, err
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip().startswith("relaydiff-bundle")
    # the exporter's chatter was real and went to the log file the command named on stderr
    (note,) = [line for line in err.splitlines() if "library output:" in line]
    log = Path(note.split("library output:", 1)[1].strip())
    assert log.parent == tmp_path / "logs" and "[torch.onnx]" in log.read_text()
    assert "[torch.onnx]" not in err and "Warning" not in err


def test_verbose_shows_library_output_on_stderr_not_stdout(tiny_family: Path, tmp_path: Path) -> None:
    cmd = [*RELAYDIFF, "export", "--family", str(tiny_family), "--exporter", "onnx", "--component", "vae_decoder",
           "--option", "write_ort=false", "--out", str(tmp_path / "e"), "--verbose"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "[torch.onnx]" in proc.stderr and "[torch.onnx]" not in proc.stdout
    assert "wrote" in proc.stdout and not (tmp_path / "logs").exists()


def test_json_error_is_one_line_and_no_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["relay", "--family", str(tmp_path / "missing"), "--prompt", "x", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and re.fullmatch(r"relaydiff: error: model folder not found: .*missing.*\n", err)


def test_relay_json_in_process_has_nothing_but_the_document(tiny_family: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["relay", "--family", str(tiny_family), "--prompt", "a red circle", "--steps", "3",
                 "--out", str(tmp_path / "i.png"), "--json", "--log-file", str(tmp_path / "l.log")]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["steps"] == 3 and out.count("\n") == 1


def test_verbose_turns_on_debug_records(tiny_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--family", str(tiny_family), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "DEBUG relaydiff.core.family: family id of" in err
    assert main(["check", "--family", str(tiny_family)]) == 0
    assert "DEBUG" not in capsys.readouterr().err
