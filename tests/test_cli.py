"""The relaydiff CLI end to end on the tiny preset, and its handling of bad input (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load, save

from relaydiff.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_relay_json_end_to_end(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, state = tmp_path / "img.png", tmp_path / "state.st"
    code, out, _ = _run(
        capsys, "relay", "--family", str(tiny_family), "--prompt", "a red circle", "--steps", "5", "--relay-step", "2",
        "--scheduler", "dpmpp_2m", "--guidance", "4", "--seed", "3", "--out", str(png), "--state-out", str(state), "--json",
    )
    assert code == 0
    payload = json.loads(out)  # exactly one JSON object, nothing else
    assert payload["relay_step"] == 2 and payload["scheduler"] == "dpmpp_2m"
    assert payload["host_seconds"] > 0 and payload["device_seconds"] > 0
    assert payload["relay_state_bytes"] == state.stat().st_size > 0
    assert Image.open(png).size == (16, 16)
    # The saved state resumes on the device to the same image.
    png2 = tmp_path / "resumed.png"
    code, out, _ = _run(capsys, "resume", "--state", str(state), "--device", str(tiny_family), "--out", str(png2), "--json")
    assert code == 0 and json.loads(out)["relay_step"] == 2
    assert list(Image.open(png).getdata()) == list(Image.open(png2).getdata())


def test_separate_host_and_device_folders_and_check(tiny_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "check", "--host", str(tiny_family), "--device", str(tiny_family), "--device-variant", "device", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_diagnose_writes_json_csv_png(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "diagnose", "--family", str(tiny_family), "--prompt", "a blue square", "--steps", "5", "--relay-step", "2",
        "--out-dir", str(tmp_path / "d"), "--json",
    )
    assert code == 0
    payload = json.loads(out)
    assert len(payload["host_only"]) == len(payload["relay"]) == len(payload["device_only"]) == 5
    assert payload["relative_deviation"][:2] == [0.0, 0.0]  # identical before the hand-off
    assert payload["relative_deviation"][4] > 0.0  # a different (random) device model diverges after it
    assert (tmp_path / "d" / "diagnostic.png").stat().st_size > 1000
    assert (tmp_path / "d" / "diagnostic.csv").read_text().count("\n") == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--relay-step", "9"], "relay step 9 is outside [0, 5]"),
        (["--relay-step", "-1"], "relay step -1 is outside"),
        (["--scheduler", "plms"], "unknown scheduler 'plms'"),
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--guidance", "nan"], "guidance scale"),
    ],
)
def test_bad_request_values(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    base = ["relay", "--family", str(tiny_family), "--prompt", "x", "--steps", "5", "--out", str(tmp_path / "o.png")]
    code, out, err = _run(capsys, *base, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_missing_family_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "relay", "--family", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "model folder not found" in err and "missing" in err


def _state_file(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    state = tmp_path / "s.st"
    main(["relay", "--family", str(tiny_family), "--prompt", "x", "--steps", "4", "--relay-step", "2",
          "--out", str(tmp_path / "a.png"), "--state-out", str(state), "--json"])
    capsys.readouterr()
    return state


def _tamper(path: Path, **tensors: torch.Tensor) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    ts = load(data)
    ts.update(tensors)
    path.write_bytes(save(ts, metadata=meta))


def test_resume_refuses_non_finite_latent(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state_file(tiny_family, tmp_path, capsys)
    _tamper(state, latents=torch.full((1, 4, 8, 8), float("nan")))
    code, _, err = _run(capsys, "resume", "--state", str(state), "--device", str(tiny_family), "--out", str(tmp_path / "b.png"))
    assert code == 2 and "NaN" in err and "Traceback" not in err


def test_resume_refuses_wrong_latent_shape(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state_file(tiny_family, tmp_path, capsys)
    _tamper(state, latents=torch.zeros(1, 3, 8, 8))
    code, _, err = _run(capsys, "resume", "--state", str(state), "--device", str(tiny_family), "--out", str(tmp_path / "b.png"))
    assert code == 2 and "channels" in err


def test_console_script_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relaydiff", "relay", "--family", str(tmp_path), "--prompt", "x"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "relaydiff: error:" in proc.stderr and "model_index.json" in proc.stderr
    assert "Traceback" not in proc.stderr
