"""One distribution, one namespace: the top-level folders import as relaydiff.* and nothing bare lands in site-packages."""

from __future__ import annotations

import importlib
import site
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["export", "quantize", "runtime", "host"])
def test_top_level_folder_is_a_relaydiff_subpackage(name: str) -> None:
    module = importlib.import_module(f"relaydiff.{name}")
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_no_bare_top_level_packages_installed() -> None:
    dist = distribution("relaydiff")
    top = {str(f).split("/")[0] for f in dist.files or []}
    for bare in ("export", "quantize", "runtime", "host"):
        assert bare not in top
        for sp in site.getsitepackages():
            assert not (Path(sp) / bare).exists(), f"bare package {bare!r} in {sp}"


def test_console_script_and_typed_marker() -> None:
    dist = distribution("relaydiff")
    assert any(ep.name == "relaydiff" and ep.value == "relaydiff.cli:main" for ep in dist.entry_points)
    assert (ROOT / "relaydiff" / "py.typed").is_file()
