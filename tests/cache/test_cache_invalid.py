"""Bad input to `eval cache` / `cache train`: the value and the valid range, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    _, err = capsys.readouterr()
    return code, err


def _eval(family: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "cache", "--family", str(family), "--prompts", "1", "--steps", "6", "--relay-steps", "2",
            "--out-dir", str(out), *extra]


@pytest.mark.parametrize("budgets, message", [
    ("0", "cache budget 0 is outside [1, 4]"),
    ("5", "cache budget 5 is outside [1, 4]"),
    ("2,-3", "cache budget -3 is outside [1, 4]"),
])
def test_budget_outside_range(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], budgets: str, message: str) -> None:
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--budgets", budgets))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_branch_that_does_not_exist(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--cache-branch", "3", "--schedules", "uniform"))
    assert code == 2 and "cache branch 3 does not exist in this UNet" in err and "[0, 1]" in err
    assert not (tmp_path / "o").exists()
    code, err = _run(capsys, "cache", "train", "--family", str(tiny_family), "--cache-branch", "2", "--out", str(tmp_path / "p"),
                     "--relay-steps", "2", "--prompts", "1", "--max-updates", "1")
    assert code == 2 and "cache branch 2 does not exist in this UNet" in err and "[0, 1]" in err
    assert not list(tmp_path.glob("p*"))


def test_policy_from_another_family(tiny_family: Path, tiny_policy_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "policies"
    other.mkdir()
    for mech in ("reuse", "forecast"):
        raw = json.loads((tiny_policy_dir / f"{mech}.json").read_text())
        (other / f"{mech}.json").write_text(json.dumps({**raw, "family_id": "tinyshapes-a2c85328336d"}))
        (other / f"{mech}.safetensors").write_bytes((tiny_policy_dir / f"{mech}.safetensors").read_bytes())
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--policy-dir", str(other)))
    assert code == 2 and "trained for family 'tinyshapes-a2c85328336d'; the device model is family 'fam-" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_missing_policy_and_unknown_names(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--policy-dir", str(tmp_path / "none")))
    assert code == 2 and "no learned reuse policy at" in err and "relaydiff cache train" in err
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--mechanisms", "teleport"))
    assert code == 2 and "unknown cache mechanism 'teleport'; expected one of: reuse, forecast" in err
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--schedules", "random"))
    assert code == 2 and "unknown schedule 'random'; expected one of: uniform, heuristic, learned" in err
    code, err = _run(capsys, *_eval(tiny_family, tmp_path / "o", "--relay-steps", "6"))
    assert code == 2 and "relay step 6 is outside [0, 5]" in err
    assert not (tmp_path / "o").exists()
