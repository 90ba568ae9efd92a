"""The student record: read and validated (JSON schema) in one place, written back as the same JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.student import STUDENT_FILE, StudentSpec, read_student

GOOD: dict[str, Any] = {"format": "relaydiff-student/1", "teacher": "device", "relay_step": 8, "steps": 25, "student_steps": 4,
                        "guidance_scale": 5.0, "sampler": "ddim", "parametrization": "eps", "method": "progressive",
                        "coarse_timesteps": [641, 481, 321, 161], "teacher_unet_passes": 34, "student_unet_passes": 4,
                        "training": {"updates": 3}}


def test_round_trip(tmp_path: Path) -> None:
    spec = StudentSpec.from_json(GOOD)
    assert spec.to_json() == GOOD and spec.coarse_timesteps == (641, 481, 321, 161)
    spec.write(tmp_path)
    assert read_student(tmp_path) == spec and read_student(tmp_path / "nowhere") is None


@pytest.mark.parametrize(("change", "expect"), [
    ({"student_steps": "4"}, "$.student_steps: '4' is not of type 'integer'"),
    ({"format": "relaydiff-student/2"}, "$.format: 'relaydiff-student/2' is not one of"),
    ({"parametrization": "x0"}, "$.parametrization: 'x0' is not one of"),
    ({"unknown": 1}, "Additional properties are not allowed ('unknown' was unexpected)"),
    ({"sampler": "euler"}, "only 'ddim' students are supported, got 'euler'"),
    ({"student_steps": 30}, "student_steps/relay_step/steps out of range"),
    ({"parametrization": "lcm"}, "an lcm student needs a positive 'timestep_scaling' and 'sigma_data'"),
    ({"parametrization": "lcm", "timestep_scaling": 0, "sigma_data": 0.5}, "$.timestep_scaling: 0 is less than or equal to the minimum of 0"),
    ({"parametrization": "lcm", "timestep_scaling": float("inf"), "sigma_data": 0.5}, "timestep_scaling must be a finite number, got inf"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number, got nan"),
])
def test_bad_values_are_refused_naming_the_value(tmp_path: Path, change: dict[str, Any], expect: str) -> None:
    (tmp_path / STUDENT_FILE).write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(RelaydiffError) as exc:
        read_student(tmp_path)
    assert expect in str(exc.value) and str(tmp_path / STUDENT_FILE) in str(exc.value)
    missing = {k: v for k, v in GOOD.items() if k != "teacher"}
    with pytest.raises(RelaydiffError, match="'teacher' is a required property"):
        StudentSpec.from_json(missing)
