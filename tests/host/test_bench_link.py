"""`relaydiff bench link` on the tiny family: both measurements run, every request is answered once, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cli import main
from relaydiff.core.errors import RelaydiffError
from relaydiff.host.bench import LinkBenchConfig, bench_link, format_report


def test_bench_link_measures_handoff_and_throughput(tiny_family: Path) -> None:
    config = LinkBenchConfig(rounds=12, family=tiny_family, devices=3, requests_per_device=2, steps=4, fraction=0.5, max_batch=3)
    report = bench_link(config)
    h = report["handoff"]
    assert h["state_bytes"] > 4 * 64 * 64 * 4 + 2 * 77 * 768 * 4  # the SD-size latent and both embeddings travel
    assert h["overhead_ms"] == pytest.approx(h["handoff_round_trip_ms_median"] - h["ping_rtt_ms_median"], abs=2e-3)
    assert h["ping_rtt_ms_median"] > 0
    t = report["throughput"]
    runs = {(r["mode"], r["max_batch"]): r for r in t["runs"]}
    assert set(runs) == {("host-only", 1), ("relay", 1), ("host-only", 3), ("relay", 3)}
    for r in runs.values():
        assert r["requests"] == 6 and r["answered_exactly_once"], r
        assert r["requests_per_s"] == pytest.approx(6 / r["wall_s"], rel=1e-2)
        assert 0 < r["host_busy_s"] <= r["wall_s"] * 1.05
        assert r["host_capacity_requests_per_s"] == pytest.approx(6 / r["host_busy_s"], rel=1e-2)
    assert runs[("relay", 1)]["relay_step"] == 2 and runs[("host-only", 1)]["relay_step"] == 4
    assert runs[("relay", 1)]["modes_seen_by_devices"] == {"relay": 6}
    assert runs[("host-only", 1)]["modes_seen_by_devices"] == {"host-only": 6}
    assert runs[("relay", 1)]["mean_batch"] == 1.0
    assert t["relay_over_host_only"] == pytest.approx(
        runs[("relay", 1)]["requests_per_s"] / runs[("host-only", 1)]["requests_per_s"], rel=1e-2)
    assert t["host_capacity_relay_over_host_only"] == pytest.approx(
        runs[("relay", 1)]["host_capacity_requests_per_s"] / runs[("host-only", 1)]["host_capacity_requests_per_s"], rel=1e-2)
    text = format_report(report)
    assert "overhead" in text and "relay / host-only" in text


def test_bench_link_cli_json_overhead_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "link", "--rounds", "10", "--no-throughput", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["handoff"]["rounds"] == 10 and "throughput" not in report


@pytest.mark.parametrize(("argv", "match"), [
    (["--rounds", "0"], "rounds must be a positive integer, got 0"),
    (["--fraction", "1.5"], "fraction must be in"),
    (["--family", "/nonexistent/family"], "does not exist"),
])
def test_bench_link_bad_input_exits_2_with_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "link", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bench_link_config_checks_values() -> None:
    with pytest.raises(RelaydiffError, match="devices must be a positive integer"):
        LinkBenchConfig(devices=0)
