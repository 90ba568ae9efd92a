"""The SDXL- and SD3.5-shaped presets: parameter counts on the meta device against the published totals.

Nothing is allocated (``torch.device("meta")``). Published totals, and where they come from:
- SD3.5 Large transformer: 8.1B ("8.1 billion parameters", Stability AI's SD3.5 release note and the
  stabilityai/stable-diffusion-3.5-large model card).
- SDXL base UNet: 2,567,463,684 (2.6B in Podell et al. 2023, Table 1; the exact figure is the diffusers
  UNet of stabilityai/stable-diffusion-xl-base-1.0).
- Segmind-Vega UNet: 745M (segmind/Segmind-Vega model card; Gupta et al. 2024, arXiv 2401.02677).
- SSD-1B UNet: "1.3B" (segmind/SSD-1B model card), a figure rounded to 0.1B: it is checked to its rounding.
- SD3.5 Medium transformer: marketed as "2.5 billion parameters"; the released config (24 layers, width 1536,
  dual attention in layers 0-12) gives 2.243B, 10% less, so that figure is not checked within 2% here (see
  docs/family-styles.md); the test pins the architecture instead.
"""

from __future__ import annotations

import pytest

from relaydiff.presets import count_parameters, get_preset


def _within(count: int, published: float, rel: float) -> bool:
    return abs(count - published) <= rel * published


@pytest.fixture(scope="module")
def sd35() -> dict[str, int]:
    return count_parameters("sd35-large-medium")


@pytest.fixture(scope="module")
def sdxl() -> dict[str, int]:
    return count_parameters("sdxl-ssd1b")


def test_sd35_large_transformer_matches_the_published_total(sd35: dict[str, int]) -> None:
    assert _within(sd35["host_transformer"], 8.1e9, 0.02), sd35["host_transformer"]


def test_sd35_medium_is_the_mmdit_x_architecture(sd35: dict[str, int]) -> None:
    medium = get_preset("sd35-large-medium").device_unet
    assert medium["dual_attention_layers"] == tuple(range(13)) and medium["qk_norm"] == "rms_norm"
    # 2.24B: between SD3 Medium's 2.0B (same width and depth, no dual attention) and the marketed 2.5B
    assert 2.0e9 < sd35["device_transformer"] < 2.5e9
    assert sd35["device_transformer"] < sd35["host_transformer"] / 3


def test_sd3_text_encoders_and_vae_have_the_published_sizes(sd35: dict[str, int]) -> None:
    assert _within(sd35["text_encoder_3"], 4.76e9, 0.02)  # T5 v1.1 XXL encoder, 4.76B
    assert _within(sd35["text_encoder_2"], 694.7e6, 0.02)  # OpenCLIP bigG text tower with projection
    assert _within(sd35["text_encoder"], 123.7e6, 0.02)  # CLIP ViT-L/14 text tower with projection
    assert _within(sd35["vae"], 83.8e6, 0.02)  # the 16-channel SD3 VAE (no quant convs)


def test_sdxl_base_ssd1b_and_vega_unets_match_the_published_totals(sdxl: dict[str, int]) -> None:
    assert sdxl["host_unet"] == 2_567_463_684
    assert abs(sdxl["device_unet"] - 1.3e9) < 0.05e9, sdxl["device_unet"]  # "1.3B", to its rounding
    assert _within(sdxl["vega_unet"], 745e6, 0.02), sdxl["vega_unet"]
