"""The compatibility check across family styles: an SD3 host and an SDXL device differ in every way that matters,
and the check names each of those fields; a style's own host and device pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaydiff.core import family
from relaydiff.core.errors import CompatibilityError
from relaydiff.presets import build_preset


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("styles")
    return build_preset("tiny-sd3", root / "sd3"), build_preset("tiny-sdxl", root / "sdxl")


def test_each_style_pairs_with_itself(folders: tuple[Path, Path]) -> None:
    for root in folders:
        family.check_pair(family.resolve(root, role="host"), family.resolve(root, role="device"))


def test_sd3_host_and_sdxl_device_fail_naming_every_mismatch(folders: tuple[Path, Path]) -> None:
    sd3, sdxl = folders
    with pytest.raises(CompatibilityError) as info:
        family.check_pair(family.resolve(sd3, role="host"), family.resolve(sdxl, role="device"))
    found = {f: (h, d) for f, h, d in info.value.mismatches}
    assert found["style"] == ("sd3", "sdxl")
    assert found["text_encoders.count"] == (3, 2)
    assert found["text_encoder.class"] == ("CLIPTextModelWithProjection", "CLIPTextModel")
    assert found["text_encoder_3.hidden_size"] == (32, None)
    assert found["pooled.width"] == (32, 16)
    assert found["vae.latent_channels"] == (16, 4)
    assert found["vae.scaling_factor"] == (1.5305, 0.13025)
    assert found["vae.shift_factor"] == (0.0609, None)
    assert found["scheduler.kind"] == ("flow", "diffusion")
    assert found["scheduler.prediction_type"] == ("flow", "epsilon")
    assert found["scheduler.shift"] == (3.0, None)
    assert found["time_ids.count"] == (None, 6)
    assert found["time_ids.layout"] == (None, "original_size,crop_top_left,target_size")
    assert "device unet.in_channels vs vae.latent_channels" not in found  # the device is consistent with itself
    assert "device unet.cross_attention_dim vs host text width" not in found  # both 32 in these tiny configs
    assert found["device transformer.pooled_projection_dim vs pooled.width"] == (None, 32)  # a UNet takes none
    message = str(info.value)
    for field in ("style", "pooled.width", "vae.shift_factor", "scheduler.shift", "time_ids.layout"):
        assert field in message
