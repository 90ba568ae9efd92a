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
