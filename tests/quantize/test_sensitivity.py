"""The ExecuTorch W8A8 sensitivity probe (relaydiff quantize sensitivity) on the tiny random family."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.quantize.conftest import K, STEPS


def test_probe_reports_each_float_set(tiny_family: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relaydiff.cli import main

    rc = main(["quantize", "sensitivity", "--family", str(tiny_family), "--relay-step", str(K), "--steps", str(STEPS), "--probe", "none",
               "--probe", "unet.up_blocks.-1,unet.conv_out", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    none, tail = report["rows"]
    assert none["float"] == [] and none["float_parameter_share"] == 0.0
    assert tail["float"][-1] == "unet.conv_out" and tail["float"][0].startswith("unet.up_blocks.")
    assert 0.0 < tail["float_parameter_share"] < 1.0
    for row in report["rows"]:
        assert math.isfinite(row["denoiser_psnr_db"]) and math.isfinite(row["last_step_psnr_db"])
        assert 0.0 < row["image_psnr_db"] <= row["image_psnr_db_mean"]


def test_default_probes_cover_every_child(tiny_pair: Any) -> None:
    from relaydiff.export import get_component
    from relaydiff.quantize.executorch_int8 import DEFAULT_FLOAT_MODULES
    from relaydiff.quantize.sensitivity import default_probes

    root = get_component("unet_step").module(tiny_pair[1])
    probes = default_probes(root)
    assert probes[0] == () and probes[-1] == DEFAULT_FLOAT_MODULES
    names = {p[0] for p in probes[1:-1]}
    assert {"unet.conv_in", "unet.conv_out", "unet.down_blocks.0", f"unet.up_blocks.{len(root.unet.up_blocks) - 1}"} <= names


def test_bad_family_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relaydiff.cli import main

    assert main(["quantize", "sensitivity", "--family", str(tmp_path / "missing"), "--probe", "none"]) == 2
    assert "missing" in capsys.readouterr().err
