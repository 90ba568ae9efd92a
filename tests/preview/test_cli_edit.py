"""``relaydiff edit`` end to end on the tiny preset, and its bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.cli import main


def test_edit_json(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "rounds.txt"
    prompts.write_text("a red circle on the left\na red square on the left\n")
    code = main(["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--steps", "4", "--preview-steps", "2", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    payload = json.loads(out)
    assert [r["reused"] for r in payload["rounds"]] == [False, True] and payload["final"]["source"] == "host"
    assert (tmp_path / "o" / "contact_sheet.png").is_file() and (tmp_path / "o" / "round_2.png").is_file()
    code = main(["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--out", str(tmp_path / "p"),
                 "--steps", "4", "--preview-steps", "2", "--no-host", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["final"]["source"] == "preview"


@pytest.mark.parametrize("text, extra, message", [
    ("a red circle on the left\n\na blue circle on the left\n", [], "round 2 is empty"),
    ("a red circle on the left\n", ["--refine-strength", "1.5"], "refine_strength: strength 1.5 is outside (0, 1]"),
    ("a red circle on the left\n", ["--reuse-strength", "auto"], "needs --predictors"),
])
def test_edit_bad_input(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                        extra: list[str], message: str) -> None:
    prompts = tmp_path / "rounds.txt"
    prompts.write_text(text)
    code = main(["edit", "--family", str(tiny_family), "--prompts", str(prompts), "--out", str(tmp_path / "o"), *extra])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
