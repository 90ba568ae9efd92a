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
