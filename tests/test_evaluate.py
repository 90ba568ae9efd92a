"""`relaydiff eval relay` on the tiny preset: the sweep's structure, metrics and files (quality is meaningless on random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from relaydiff.cli import main
from relaydiff.evaluate import EvalConfig, eval_prompts, psnr, run_eval, ssim


def test_metrics() -> None:
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, a) == float("inf")
    assert psnr(a, b) == pytest.approx(10 * np.log10(255.0**2 / (255.0**2 / (16 * 16 * 3))))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < 1.0


def test_prompts_are_split_over_object_counts() -> None:
    from relaydiff.world import parse_prompt

    prompts = eval_prompts(7, seed=0)
    counts = [parse_prompt(p).n_objects for p in prompts]
    assert counts == [1, 1, 1, 2, 2, 3, 3]
    assert eval_prompts(7, seed=0) == prompts


def test_sweep_on_tiny_family(tiny_pair) -> None:
    host, device = tiny_pair
    cfg = EvalConfig(prompts=3, steps=4, fractions=(0.0, 0.5, 1.0), grid_rows=2)
    report = run_eval(host, device, cfg, progress=False)
    assert report["relay_steps"] == [0, 2, 4]
    assert len(report["rows"]) == 9
    by_k = {s["k"]: s for s in report["summary"]}
    assert by_k[4]["psnr_vs_host_db"] is None and by_k[4]["ssim_vs_host"] == pytest.approx(1.0)
    assert by_k[0]["host_seconds"] == 0.0 and by_k[2]["host_seconds"] > 0
    assert by_k[4]["device_seconds"] < by_k[0]["device_seconds"]  # host-only: the device only decodes
    assert by_k[0]["psnr_vs_host_db"] < 60
    for s in report["summary"]:
        assert 0.0 <= s["accuracy"] <= 1.0 and s["prompts"] == 3
    assert len(report["grid"]) == 2 and len(report["grid"][0]) == 3


def test_cli_writes_report_grid_plot_and_diagnostic(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    code = main(["eval", "relay", "--family", str(tiny_family), "--prompts", "2", "--steps", "3", "--out-dir", str(out), "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert [s["k"] for s in payload["summary"]] == [0, 1, 2, 3]
    for name in ("report.json", "rows.csv", "grid.png", "accuracy.png", "diagnostic/diagnostic.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["config"]["prompts"] == 2


def test_bad_eval_values(tiny_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "relay", "--family", str(tiny_family), "--prompts", "0"]) == 2
    assert "--prompts must be >= 1, got 0" in capsys.readouterr().err
