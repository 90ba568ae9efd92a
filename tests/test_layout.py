"""One distribution, one namespace: the top-level folders import as relaydiff.* and nothing bare lands in site-packages."""

from __future__ import annotations

import importlib
import site
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["export", "quantize", "runtime", "host"])
def test_top_level_folder_is_a_relaydiff_subpackage(name: str) -> None:
    module = importlib.import_module(f"relaydiff.{name}")
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_wheel_holds_only_the_relaydiff_namespace(tmp_path: Path) -> None:
    """Build the wheel and look inside: what a non-editable install would put in site-packages."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("relaydiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"relaydiff", f"relaydiff-{distribution('relaydiff').version}.dist-info"}, top
    for sub in ("export", "quantize", "runtime", "host", "core"):
        assert f"relaydiff/{sub}/__init__.py" in names
    assert "relaydiff/py.typed" in names
    assert {"relaydiff/runtime/manifest.schema.json", "relaydiff/core/student.schema.json"} <= set(names)  # the schemas ship


def test_no_bare_top_level_packages_in_site_packages() -> None:
    for bare in ("export", "quantize", "runtime", "host"):
        for sp in site.getsitepackages():
            assert not (Path(sp) / bare).exists(), f"bare package {bare!r} in {sp}"


def test_console_script_and_typed_marker() -> None:
    dist = distribution("relaydiff")
    assert any(ep.name == "relaydiff" and ep.value == "relaydiff.cli:main" for ep in dist.entry_points)
    assert (ROOT / "relaydiff" / "py.typed").is_file()
