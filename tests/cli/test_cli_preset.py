"""`relaydiff preset`: meta-device counts without --out; a large preset is built only with --materialize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cli import main


def test_counts_without_out_allocate_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preset", "sdxl-ssd1b", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parameters"]["host_unet"] == 2_567_463_684 and doc["total"] == sum(doc["parameters"].values())
    assert doc["weight_bytes"] == 4 * doc["total"]


def test_a_large_preset_needs_materialize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sdxl"
    assert main(["preset", "sdxl-ssd1b", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--materialize" in err and "5.55B parameters" in err and "Traceback" not in err
    assert not out.exists()
