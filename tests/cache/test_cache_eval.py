"""`eval cache` on the tiny family: structure, exact budgets, paired comparisons, files (quality is meaningless here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cache.evaluate import CacheEvalConfig, run_cache_eval, write_outputs
from relaydiff.cli import main


def test_eval_cache_report(tiny_pair, tiny_policy_dir: Path, tmp_path: Path) -> None:
    host, device = tiny_pair
    cfg = CacheEvalConfig(prompts=3, steps=6, relay_steps=(2,), fractions=(1.0, 0.5, 0.25), policy_dir=str(tiny_policy_dir),
                          latency_prompts=1, latency_repeats=1, bootstrap=200, grid_rows=2)
    report = run_cache_eval(host, device, cfg, progress=False)
    m = 4
    assert cfg.budgets_for(2) == [4, 2, 1]
    from relaydiff.evaluate import eval_noise_seed
    from relaydiff.world.splits import split_of

    assert {split_of(r["prompt"]) for r in report["rows"]} == {"test"}  # the reported figures' split, its noise seeds
    assert {r["seed"] for r in report["rows"]} == {eval_noise_seed("test", 0, i) for i in range(3)}
    cached = [r for r in report["rows"] if r["schedule"] != "uncached"]
    assert len(cached) == 3 * 2 * 3 * 3  # prompts x mechanisms x schedules x budgets
    assert all(r["schedule_mask"].count("1") == r["budget"] and r["schedule_mask"][0] == "1" for r in cached)
    for r in cached:
        if r["budget"] == m:  # every step full: the uncached image itself
            assert r["psnr"] == report["psnr_cap_db"] and r["ssim"] == pytest.approx(1.0)
    flops = report["flops"]
    assert flops["cached_step"] < flops["full_step"]
    ratios = [flops["device_half"]["2"][str(b)]["ratio_vs_uncached"] for b in (4, 2, 1)]
    assert ratios[0] == 1.0 and ratios[0] > ratios[1] > ratios[2]
    lat = report["latency"]["per_k"]["2"]["reuse"]
    assert set(lat) == {"4", "2", "1"} and lat["4"]["ratio_vs_uncached"] == 1.0
    s = next(e for e in report["summary"] if e["schedule"] == "learned" and e["budget"] == 2 and e["mechanism"] == "reuse")
    lo, hi = s["psnr_db_ci"]
    assert lo <= s["psnr_db"] <= hi and s["prompts"] == 3
    pairs = {(c["a"], c["b"]) for c in report["comparisons"]}
    assert pairs == {("learned", "uniform"), ("learned", "heuristic"), ("heuristic", "uniform")}
    full = [c for c in report["comparisons"] if c["budget"] == m]
    assert all(c["psnr_diff_db"] == 0.0 for c in full)
    paths = write_outputs(report, tmp_path / "out")
    for p in paths.values():
        assert Path(p).is_file() and Path(p).stat().st_size > 0
    assert len(report["grid"]) == 2 and len(report["grid"][0]) == len(report["grid_columns"])


def test_eval_cache_cli_json_is_one_object(tiny_family: Path, tiny_policy_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "cache", "--family", str(tiny_family), "--prompts", "1", "--steps", "5", "--relay-steps", "2",
                 "--budgets", "3,1", "--mechanisms", "reuse", "--policy-dir", str(tiny_policy_dir), "--latency-prompts", "1",
                 "--latency-repeats", "1", "--out-dir", str(tmp_path / "o"), "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    payload = json.loads(out)
    assert {s["budget"] for s in payload["summary"] if s["schedule"] != "uncached"} == {3, 1}
    assert (tmp_path / "o" / "quality.png").is_file()


def test_eval_cache_split_is_checked() -> None:
    from relaydiff.core.errors import RelaydiffError
    from relaydiff.evaluate import eval_prompts
    from relaydiff.world.splits import split_of

    assert CacheEvalConfig().split == "test"
    for split in ("val", "test"):
        assert {split_of(p) for p in eval_prompts(6, CacheEvalConfig(split=split).seed, split)} == {split}
    with pytest.raises(RelaydiffError, match="split must be 'val' or 'test', got 'train'"):
        CacheEvalConfig(split="train")
