"""``relaydiff eval scheduler``: the table format, building it from eval relay reports, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cli import main
from relaydiff.eval_scheduler import (
    SchedulerEvalConfig,
    TableError,
    load_table,
    run_scheduler_eval,
    synthetic_table,
    table_from_relay_reports,
)


def _relay_report(n: int = 10) -> dict:
    """An eval relay report (only the fields the table reads): host 0.1 + 0.02 k s, device 0.5 + 0.2 (N - k) s."""
    summary = []
    for k in (0, 3, 5, 10):
        summary.append({"k": k, "fraction": k / n, "accuracy": 0.5,
                        "accuracy_by_complexity": {"4": [0.6 + 0.03 * k, 10], "7": [0.3 + 0.05 * k, 10]},
                        "attribute_accuracy_by_complexity": {"4": [0.9, 10], "7": [0.7 + 0.01 * k, 10]},
                        "host_seconds": 0.1 + 0.02 * k if k else 0.0, "device_seconds": 0.5 + 0.2 * (n - k)})
    return {"config": {"steps": n}, "summary": summary}


def test_table_from_relay_report_and_round_trip(tmp_path: Path) -> None:
    table = table_from_relay_reports({"fp32": _relay_report()}, state_bytes=1234, source="unit test")
    assert table.steps == 10 and table.fractions == (0.0, 0.3, 0.5, 1.0) and table.complexities == (4, 7)
    assert table.host_step_s == pytest.approx(0.02) and table.host_overhead_s == pytest.approx(0.1)
    v = table.variants["fp32"]
    assert v.device_step_s == pytest.approx(0.2) and v.device_overhead_s == pytest.approx(0.5)
    assert v.quality[1] == pytest.approx((0.3, 0.45, 0.55, 0.8))
    assert load_table(table.save(tmp_path / "t.json")) == table
    graded = table_from_relay_reports({"fp32": _relay_report()}, state_bytes=1234, quality_metric="attribute_accuracy")
    assert graded.variants["fp32"].quality[1] == pytest.approx((0.7, 0.73, 0.75, 0.8))
    assert "attribute_accuracy" in graded.source
    with pytest.raises(TableError, match="quality metric 'psnr' is unknown"):
        table_from_relay_reports({"fp32": _relay_report()}, state_bytes=1, quality_metric="psnr")


def test_bad_tables(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="scheduler table not found: .*build it with"):
        load_table(tmp_path / "missing.json")
    obj = synthetic_table().to_json()
    obj["variants"]["fp32"]["quality"][0][2] = 1.7
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(TableError, match=r"variants\['fp32'\].quality is .*expected 6 rows"):
        load_table(tmp_path / "bad.json")
    with pytest.raises(TableError, match="relay steps"):
        table_from_relay_reports({"a": {"config": {"steps": 10}, "summary": _relay_report()["summary"][1:]}}, state_bytes=0)


def test_oracle_is_best_and_bandit_learns() -> None:
    result = run_scheduler_eval(synthetic_table(), SchedulerEvalConfig(requests=300, seed=0))
    report = result["report"]
    by_name = {p["policy"]: p for p in report["policies"]}
    assert report["policies"][0]["policy"] == "oracle" and by_name["oracle"]["regret"] == 0
    assert by_name["bandit (LinUCB)"]["expected_reward"] > by_name["random"]["expected_reward"]
    assert "replayed from a scheduler table measured from real generation" in report["source"]


def test_cli_eval_scheduler_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = synthetic_table().save(tmp_path / "table.json")
    out = tmp_path / "out"
    code = main(["eval", "scheduler", "--table", str(table), "--requests", "250", "--seed", "1", "--json", "--out-dir", str(out)])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert {"source", "policies", "targets", "best_fixed", "files"} <= set(payload)
    assert {"bandit (LinUCB)", "oracle", "random", "host-only", "device-only"} <= {p["policy"] for p in payload["policies"]}
    assert (out / "regret.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads((out / "report.json").read_text())["config"]["requests"] == 250


def test_cli_builds_the_table_from_relay_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.json").write_text(json.dumps(_relay_report()))
    table = tmp_path / "table.json"
    code = main(["eval", "scheduler", "--from-relay-report", f"fp32={tmp_path / 'report.json'}", "--state-bytes", "5000",
                 "--table", str(table), "--requests", "50", "--out-dir", str(tmp_path / "o")])
    assert code == 0 and load_table(table).state_bytes == 5000
    assert "bandit (LinUCB)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--table", "{tmp}/missing.json"],
    ["--table", "{tmp}/t.json", "--requests", "0"],
    ["--from-relay-report", "nonsense", "--table", "{tmp}/t2.json", "--state-bytes", "1"],
])
def test_cli_bad_input_exits_2_with_one_line(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_table().save(tmp_path / "t.json")
    code = main(["eval", "scheduler", *[a.format(tmp=tmp_path) for a in argv], "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("relaydiff: error: ") and err.count("\n") == 1 and "Traceback" not in err
