"""`relaydiff relay` and `diagnose` (the latent-norm deviation of RISE Fig. 2) on the tiny SD3-style
and SDXL-style families (issue 15 item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from relaydiff.cli import main

SAMPLER = {"sd3": "flow_euler", "sdxl": "euler"}  # the folder's own scheduler, which the CLI picks by default


@pytest.fixture(params=["sd3", "sdxl"])
def style_root(request, tiny_sd3_pair, tiny_sdxl_pair) -> tuple[str, Path]:  # type: ignore[no-untyped-def]
    """(style, family folder) of each tiny family style."""
    pair = {"sd3": tiny_sd3_pair, "sdxl": tiny_sdxl_pair}[request.param]
    return request.param, Path(pair[0].ref.root)


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:  # type: ignore[type-arg]
    code = main(list(argv))
    out, _ = capsys.readouterr()
    assert code == 0, out
    return json.loads(out)  # exactly one JSON document on stdout


def test_relay_and_diagnose_on_each_style(style_root, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    style, root = style_root
    png, state = tmp_path / "relay.png", tmp_path / "state.st"
    payload = _json(capsys, "relay", "--family", str(root), "--prompt", "a red circle", "--steps", "4", "--relay-step", "2",
                    "--guidance", "4", "--out", str(png), "--state-out", str(state), "--json")
    assert payload["scheduler"] == SAMPLER[style] and payload["relay_step"] == 2
    assert payload["relay_state_bytes"] == state.stat().st_size > 0
    assert Image.open(png).size == (16, 16)

    out_dir = tmp_path / "d"
    payload = _json(capsys, "diagnose", "--family", str(root), "--prompt", "a blue square", "--steps", "4",
                    "--relay-step", "2", "--guidance", "4", "--out-dir", str(out_dir), "--json")
    assert payload["sampler"] == SAMPLER[style]
    assert len(payload["host_only"]) == len(payload["relay"]) == len(payload["device_only"]) == 4
    assert payload["relay"][:2] == payload["host_only"][:2] and payload["relative_deviation"][:2] == [0.0, 0.0]
    assert payload["relative_deviation"][3] > 0.0  # another (random) device network diverges after the hand-off
    assert payload["max_deviation_after_handoff"] == max(payload["relative_deviation"][2:])
    assert (out_dir / "diagnostic.png").stat().st_size > 1000
    assert (out_dir / "diagnostic.csv").read_text().count("\n") == 5
