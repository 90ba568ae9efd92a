"""Fixtures of the export tests: the tiny family's device model and artifacts exported once per session.

Exports are cached by (exporter, options, component) so that a test module that needs an artifact
another module already made does not pay for it again (the ExecuTorch UNet lowering alone takes ~40 s
on two shared cores).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def device_model(tiny_family: Path):  # type: ignore[no-untyped-def]
    from relaydiff.core import family

    return family.load(family.resolve(tiny_family, role="device"))


@pytest.fixture(scope="session")
def exported(device_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """exported(exporter, component, **options) -> Artifact, exported once per session."""
    from relaydiff.export import get_component, get_exporter

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple[Any, ...], Any] = {}

    def get(exporter: str, component: str, **options: Any) -> Any:
        key = (exporter, tuple(sorted(options.items())), component)
        if key not in cache:
            sub = "-".join([exporter, *(f"{k}={v}" for k, v in sorted(options.items()))])
            cache[key] = get_exporter(exporter, **options).export(get_component(component), device_model, root / sub)
        return cache[key]

    return get
