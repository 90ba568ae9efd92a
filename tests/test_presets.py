"""Architecture presets: public-config shapes (parameter counts) and loadable diffusers folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.presets import count_parameters, get_preset


def test_sd15_and_bksdm_small_shapes_match_the_published_parameter_counts() -> None:
    counts = count_parameters("sd15-bksdm")
    assert counts["host_unet"] == 859_520_964  # SD-1.5 UNet
    assert counts["device_unet"] == 482_346_884  # BK-SDM-small UNet (no mid block, one block per stage)
    assert counts["vae"] == 83_653_863  # SD VAE
    assert counts["text_encoder"] == 123_060_480  # CLIP ViT-L/14 text tower


def test_tiny_family_loads_as_a_standard_pipeline(tiny_family: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_family), local_files_only=True, safety_checker=None)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    small = UNet2DConditionModel.from_pretrained(str(tiny_family / "unet_device"), local_files_only=True)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in pipe.unet.parameters()) / 4


def test_unknown_preset_lists_known() -> None:
    with pytest.raises(RelaydiffError, match="unknown preset .sd3.*sd15-bksdm, sd35-large-medium, sdxl-ssd1b, tiny"):
        get_preset("sd3")
