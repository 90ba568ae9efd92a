"""`relaydiff eval relay` on the tiny preset: the sweep's structure, metrics and files (quality is meaningless on random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from relaydiff.cli import main
from relaydiff.core.errors import RelaydiffError
from relaydiff.evaluate import (
    EvalConfig,
    bootstrap_ci,
    eval_noise_seed,
    eval_prompts,
    failure_rates,
    paired_diff_ci,
    psnr,
    run_eval,
    ssim,
)


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


def test_prompts_and_seeds_come_from_the_held_out_split() -> None:
    from relaydiff.world import split_of

    test, val = eval_prompts(30, seed=0), eval_prompts(30, seed=0, split="val")
    assert {split_of(p) for p in test} == {"test"} and {split_of(p) for p in val} == {"val"}
    assert EvalConfig().split == "test"
    seeds = {eval_noise_seed("test", 0, i) for i in range(30)}
    assert len(seeds) == 30 and not seeds & {eval_noise_seed("val", 0, i) for i in range(30)}
    assert min(seeds) >= 10**9  # far from the small seeds the old evaluations used
    with pytest.raises(RelaydiffError, match="'train'"):
        EvalConfig(split="train")


def test_bootstrap_ci_on_known_cases() -> None:
    # 50 of 100 right: the CI of a proportion is about 0.5 +- 1.96 * sqrt(0.25 / 100) = 0.40..0.60.
    lo, hi = bootstrap_ci([1] * 50 + [0] * 50)
    assert 0.38 <= lo <= 0.42 and 0.58 <= hi <= 0.62
    assert bootstrap_ci([1] * 50 + [0] * 50) == (lo, hi)  # seeded
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    # Paired: b is a with 10 of 100 prompts flipped from right to wrong; the difference is +0.10 and its
    # paired CI (flips only) excludes 0, while the unpaired spread of two 50% samples would not.
    a = np.array([1] * 60 + [0] * 40)
    b = a.copy()
    b[:10] = 0
    d, dlo, dhi = paired_diff_ci(a, b)
    assert d == pytest.approx(0.10) and 0.03 <= dlo < 0.10 < dhi <= 0.17
    with pytest.raises(ValueError, match="equal shapes"):
        paired_diff_ci([1, 0], [1])


def test_failure_rates_by_check_kind() -> None:
    rates = failure_rates([[("object0.shape", False), ("object1.shape", True), ("relation0", False)],
                           [("object0.shape", True), ("count", True)]])
    assert rates == {"count": 0.0, "relation": 1.0, "shape": pytest.approx(1 / 3, abs=1e-4)}


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
        lo, hi = s["accuracy_ci95"]
        assert lo <= s["accuracy"] <= hi
        assert set(s["failed_checks"]) >= {"found", "shape", "size", "count"}
    assert "accuracy_minus_host" not in by_k[4] and len(by_k[0]["accuracy_minus_host"]) == 3
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
