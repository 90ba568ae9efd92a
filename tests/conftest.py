"""Shared fixtures: a tiny random-weight family built once per test session (seconds, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from relaydiff.presets import build_preset

    return build_preset("tiny", tmp_path_factory.mktemp("tiny") / "family", seed=0)


@pytest.fixture(scope="session")
def tiny_pair(tiny_family: Path):  # type: ignore[no-untyped-def]
    from relaydiff.core import family

    host = family.load(family.resolve(tiny_family, role="host"))
    device = family.load(family.resolve(tiny_family, role="device"), share_with=host)
    return host, device


@pytest.fixture(scope="session")
def plain_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain diffusers pipeline folders (no family.json): "host", "device", and "bad" (another VAE: cannot relay)."""
    from plain_pipelines import build_pair

    return build_pair(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="session")
def tiny_sd3_pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny SD3-style family (MMDiT host, MMDiT-X device, flow schedule), loaded: (host, device)."""
    return _load_pair(tmp_path_factory, "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sdxl_pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny SDXL-style family (text-time UNets, two text encoders), loaded: (host, device)."""
    return _load_pair(tmp_path_factory, "tiny-sdxl")


def _load_pair(tmp_path_factory: pytest.TempPathFactory, name: str):  # type: ignore[no-untyped-def]
    from relaydiff.core import family
    from relaydiff.presets import build_preset

    root = build_preset(name, tmp_path_factory.mktemp(name) / "family", seed=0)
    host = family.load(family.resolve(root, role="host"))
    return host, family.load(family.resolve(root, role="device"), share_with=host)


@pytest.fixture(scope="session")
def safe_family(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny family with a tiny random-weight safety checker that flags every image (tests/safety_fixtures.py)."""
    from safety_fixtures import add_safety_checker

    return add_safety_checker(tiny_family, tmp_path_factory.mktemp("safe") / "family", flag_everything=True)


@pytest.fixture(scope="session")
def onnx_bundle(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ONNX bundle per session, shared by tests/runtime (``bundle``, ``cache_bundle``) and `bench device`:
    fp32 and int8; unet_step, vae_decoder, text_encoder, and with ``cache=True`` the cached-step pair
    (unet_step_full, unet_step_cached; fp32 only, the int8 pair is recorded skipped); N = 10, k = 3; 2 calibration
    prompts, 1 held-out parity relay; no zip. Built with one torch thread (tiny models on shared cores)."""
    import torch

    from relaydiff.export.bundle import BundleConfig, build

    out = tmp_path_factory.mktemp("onnx-bundle") / "bundle"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(BundleConfig(family=tiny_family, out=out, targets=("onnx",), precisions=("fp32", "int8"),
                           components=("unet_step", "vae_decoder", "text_encoder"), cache=True, calibration_prompts=2,
                           eval_prompts=1, zip=False, relay_step=3, steps=10), progress=False)
    finally:
        torch.set_num_threads(before)
    return out
