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
        ({"prompts": 3, "prompt_list": ("a red circle",)}, r"prompts \(3\) must be the length of prompt_list \(1\)"),
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


def test_a_prompt_list_is_summarised_not_copied() -> None:
    data = CalibrationConfig(prompts=2, prompt_list=("a red circle", "a blue square")).to_json()
    assert data["prompt_source"] == "list" and len(data["prompt_list_sha256"]) == 64 and "prompt_list" not in data
    assert CalibrationConfig().to_json()["prompt_source"] == "world"
