"""Bad calibration configs fail with the bad value quoted."""

from __future__ import annotations

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.quantize.calibration import CalibrationConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "half"}, "'half'"),
        ({"relay_steps": (25,), "steps": 25}, "relay step 25"),
        ({"relay_steps": ()}, "at least one relay step"),
        ({"guidance_scale": 1.0}, "guidance scale"),
        ({"prompts": 0}, "prompts"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(RelaydiffError, match=match):
        CalibrationConfig(**kwargs)


def test_unknown_component_lists_recorded() -> None:
    from relaydiff.quantize.calibration import CalibrationSet

    cs = CalibrationSet(CalibrationConfig(), {"unet_step": []})
    with pytest.raises(RelaydiffError, match="recorded: unet_step"):
        cs.for_component("vae")
