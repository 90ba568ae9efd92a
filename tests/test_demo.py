"""`relaydiff demo` end to end on the tiny family: bundle, host, shaped link, device fallback offline, grid and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relaydiff.cli import main
from relaydiff.demo import DemoConfig, run_demo
from relaydiff.link.shaper import NetworkConditions


def test_demo_runs_end_to_end_and_reuses_its_bundle(tiny_family: Path, tmp_path: Path) -> None:
    regimes = (NetworkConditions("wifi", 5.0, 100.0), None, NetworkConditions("3g-slow", 200.0, 2.0))
    prompts = ("a large red circle in the centre", "a small blue square left of a large green circle",
               "a small yellow triangle at the top")
    config = DemoConfig(out_dir=tmp_path / "demo", family=tiny_family, prompts=prompts, regimes=regimes, steps=4,
                        extra={"calibration_prompts": 1, "eval_prompts": 1})
    lines: list[str] = []
    report = run_demo(config, log=lines.append)
    rows = report["requests"]
    assert [r["prompt"] for r in rows] == list(prompts)
    assert [r["network"] for r in rows] == ["wifi", "offline", "3g-slow"]
    offline = rows[1]
    assert offline["mode"] == "device-only" and offline["relay_step"] == 0 and offline["fallback_reason"]
    assert offline["link_bytes"] == 0
    for r in (rows[0], rows[2]):
        assert r["mode"] in ("relay", "host-only") and 0 < r["relay_step"] <= 4 and r["host_s"] is not None
        assert r["link_bytes"] > 0 and r["end_to_end_s"] > 0 and 0.0 <= r["quality"] <= 1.0
    assert rows[2]["end_to_end_s"] >= 0.2  # the slow link's RTT is really paid
    assert "in-process shaping proxy" in report["network_emulation"]
    assert report["device_backend"] == "onnxruntime (fp32)" and not report["bundle_reused"]
    grid = Image.open(report["grid_png"])
    assert grid.size[1] > 3 * 16 * 4 and np.asarray(grid).std() > 0
    assert len(report["grid_quality"]["relay"]) == 3
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["requests"][1]["mode"] == "device-only"
    assert any("device-only" in line for line in lines)

    again = run_demo(config)
    assert again["bundle_reused"]


def test_demo_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--precision", "int4", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "precision must be 'fp32' or 'int8', got 'int4'" in err and len(err.splitlines()) == 1
    assert main(["demo", "--family", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
