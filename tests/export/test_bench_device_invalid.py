"""`relaydiff bench device` on bad input: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaydiff.cli import main


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["bench", "device", "--bundle", str(tmp_path / "nope")], capsys)
    assert err.startswith("relaydiff: error: bundle folder") and "does not exist" in err


def test_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "not a bundle folder" in _error(["bench", "device", "--bundle", str(tmp_path)], capsys)


def test_not_a_bundle_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    assert "is not a relaydiff bundle manifest" in _error(["bench", "device", "--bundle", str(tmp_path)], capsys)


@pytest.mark.parametrize(("flag", "value"), [("--repeats", "0"), ("--warmup", "-1"), ("--threads", "0")])
def test_bad_numbers_quote_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    err = _error(["bench", "device", "--bundle", str(tmp_path), flag, value], capsys)
    assert f"got {value}" in err


def test_an_empty_component_list_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["bench", "device", "--bundle", str(tmp_path), "--components", " , "], capsys)
    assert "components must name at least one component, got none" in err


def test_bench_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2
