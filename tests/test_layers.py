"""The layers point one way: core <- link <- runtime <- export, quantize <- host <- apps; no private name crosses a package.

Every import of the library (module level, inside functions and under TYPE_CHECKING alike) is read with
``ast``, resolved to the module it names, and checked against the layer table below. The checker itself
is tested on synthetic modules, so a test that cannot fail would show here.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# rank of each library package; a module may import its own rank or lower. Everything else under
# relaydiff (the CLI modules, demo, evaluation, embedded training, the scorer) is an app: rank 5.
LAYERS = {
    "relaydiff.core": 0,
    "relaydiff.world": 0,  # the prompt grammar: plain data that host, quantize and the apps share
    "relaydiff.presets": 0,  # builds tiny random-weight families; core.family calls it for the default family
    "relaydiff.link": 1,
    "relaydiff.runtime": 2,
    "relaydiff.export": 3,
    "relaydiff.quantize": 3,
    "relaydiff.host": 4,
}
APPS = 5
LAYER_NAMES = {0: "core", 1: "link", 2: "runtime", 3: "export/quantize", 4: "host", APPS: "apps"}


def package_of(module: str) -> str:
    """The package a module belongs to for the layer rules: the longest LAYERS prefix, else the app module itself."""
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return ".".join(module.split(".")[:2])


def rank(module: str) -> int:
    return LAYERS.get(package_of(module), APPS)


def library_modules() -> dict[str, Path]:
    """Every library module by dotted name, from the folder -> package map in pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    out: dict[str, Path] = {}
    for package, folder in dirs.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("").parts
            if package == "relaydiff" and rel[0] in {d.split(".")[1] for d in dirs if d != "relaydiff"}:
                continue  # not under relaydiff/ anyway; guards a folder named like a mapped package
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((package, *parts))] = path
    return out


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """(target module, imported name or "", line) for every relaydiff import in ``source``."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "relaydiff"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] == "relaydiff":
                found += [(target, a.name, node.lineno) for a in node.names]
    return found


def violations(module: str, source: str, known: set[str] | frozenset[str] = frozenset(), is_package: bool = False) -> list[str]:
    """Every reversed or private cross-package import in ``source`` (the text of ``module``)."""
    out = []
    for target, name, line in imports(module, source, is_package):
        full = f"{target}.{name}" if name and f"{target}.{name}" in known else target
        where = f"{module}:{line}: imports {target}{':' + name if name else ''}"
        if rank(full) > rank(module):
            out.append(f"{where}: {LAYER_NAMES[rank(module)]} must not depend on {LAYER_NAMES[rank(full)]}")
        if package_of(full) != package_of(module):
            private = [p for p in [*full.split("."), name] if p.startswith("_") and not p.startswith("__")]
            if private:
                out.append(f"{where}: private name {private[0]!r} used outside {package_of(full)}")
    return out


def test_the_library_imports_only_down_and_only_public_names() -> None:
    modules = library_modules()
    assert "relaydiff.runtime.sessions" in modules and "relaydiff.core.relay" in modules
    found = []
    for name, path in sorted(modules.items()):
        found += violations(name, path.read_text(), set(modules), is_package=path.name == "__init__.py")
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(("module", "source", "expect"), [
    ("relaydiff.core.relay", "from relaydiff.runtime.backends import create_backend", "core must not depend on runtime"),
    ("relaydiff.runtime.backends", "def f():\n    from relaydiff.export.bench import open_session\n", "runtime must not depend on export"),
    ("relaydiff.runtime.backends", "from relaydiff.quantize import parity", "runtime must not depend on export/quantize"),
    ("relaydiff.link.events", "import relaydiff.host.controller", "link must not depend on host"),
    ("relaydiff.host.controller", "from relaydiff import demo", "host must not depend on apps"),
    ("relaydiff.core.relay", "from ..runtime.sessions import ArtifactSession", "core must not depend on runtime"),
    ("relaydiff.quantize.onnx_int8", "from relaydiff.export.onnx import _convert_to_ort", "private name '_convert_to_ort'"),
    ("relaydiff.export.bundle", "from relaydiff.quantize._helpers import x", "private name '_helpers'"),
    ("relaydiff.cli", "from relaydiff.core.family import _library_class", "private name '_library_class'"),
])
def test_the_checker_finds_a_bad_import(module: str, source: str, expect: str) -> None:
    found = violations(module, source, {"relaydiff.demo", "relaydiff.quantize.parity"})
    assert len(found) == 1 and expect in found[0], found


@pytest.mark.parametrize(("module", "source"), [
    ("relaydiff.runtime.backends", "from relaydiff.core.relay import RelayRequest\nfrom relaydiff.link.events import Hello"),
    ("relaydiff.export.bundle", "from relaydiff.quantize.parity import relay_parity"),  # peers, public names
    ("relaydiff.quantize.onnx_int8", "from relaydiff.quantize.calibration import _private_inside_the_package"),
    ("relaydiff.cli", "from relaydiff.host.controller import HostServer\nfrom relaydiff import demo"),
    ("relaydiff.export", "from . import onnx as _onnx"),  # a package's own submodule under a private alias
])
def test_the_checker_passes_a_good_import(module: str, source: str) -> None:
    assert violations(module, source, is_package=module == "relaydiff.export") == []


# -- the link core carries bytes: no torch anywhere under relaydiff.link, nor in what it imports ---------------

TORCH_MODULES = ("torch", "safetensors.torch")


def torch_imports(source: str) -> list[tuple[str, int]]:
    """(module, line) for every import of torch (or safetensors' torch API) in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [(n, node.lineno) for n in names if any(n == t or n.startswith(t + ".") for t in TORCH_MODULES)]
    return found


def test_the_link_imports_no_torch_directly_or_through_relaydiff() -> None:
    modules = library_modules()
    todo = [name for name in modules if rank(name) == LAYERS["relaydiff.link"]]
    assert "relaydiff.link.events" in todo and "relaydiff.link.transport" in todo
    seen: set[str] = set()
    found = []
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        path = modules[name]
        source = path.read_text()
        found += [f"{name}:{line}: imports {mod}" for mod, line in torch_imports(source)]
        for target, imported, _ in imports(name, source, is_package=path.name == "__init__.py"):
            todo += [target, f"{target}.{imported}"]
    assert "relaydiff.core.errors" in seen and "relaydiff.core.state" not in seen
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(("source", "expect"), [
    ("import torch", ["torch"]),
    ("def f():\n    from safetensors.torch import load\n", ["safetensors.torch"]),
    ("import torch.nn as nn", ["torch.nn"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n", ["torch"]),
    ("import torchvision\nfrom safetensors import safe_open\nimport json", []),
])
def test_the_torch_checker(source: str, expect: list[str]) -> None:
    assert [m for m, _ in torch_imports(source)] == expect
