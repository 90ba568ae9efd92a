"""Fixtures of the bundle conformance suite: the bundle under test, its family, and inputs from real relays.

``RELAYDIFF_BUNDLE=DIR`` tests that bundle; the torch reference is its family, found through
``RELAYDIFF_FAMILY=DIR`` or the family folder recorded in the artifacts' metadata (either must have the
manifest's config hash). Unset, a tiny bundle is built once per session from the random-weight ``tiny``
preset: ONNX (``RELAYDIFF_DEVICE_TESTS_TARGETS`` adds ``executorch``, ``coreml``), fp32 and int8,
``unet_step`` and ``vae_decoder``, N = 10, k = 3 -- twice: once for the preset's device UNet and once
for a student distilled from it in a few updates (``RELAYDIFF_DEVICE_TESTS_VARIANTS``, default
``device,student``), so every check also runs on an exported student's one-pass ``unet_step``.

Tests that take ``artifact_key`` are parametrized at collection time with the bundle's artifacts
("target/precision/component"), filtered by their ``@pytest.mark.artifacts(...)`` marker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

BUNDLE_ENV = "RELAYDIFF_BUNDLE"  # a bundle folder to test instead of the tiny one
FAMILY_ENV = "RELAYDIFF_FAMILY"  # the bundle's family folder (torch reference), when its recorded path is gone
TARGETS_ENV = "RELAYDIFF_DEVICE_TESTS_TARGETS"  # targets of the self-built tiny bundle (default: onnx)
TINY_PRECISIONS = ("fp32", "int8")
TINY_COMPONENTS = ("unet_step", "vae_decoder")  # what the checks use; the text encoder runs on the host side of these tests
TINY_CACHE_COMPONENTS = ("unet_step_full", "unet_step_cached")  # with --cache (fp32; a student's bundle records them skipped)
TINY_RELAY = {"relay_step": 3, "steps": 10}
VARIANTS_ENV = "RELAYDIFF_DEVICE_TESTS_VARIANTS"  # device variants of the self-built tiny bundles (default: device,student)


def tiny_variants() -> tuple[str, ...]:
    names = tuple(v.strip() for v in os.environ.get(VARIANTS_ENV, "device,student").split(",") if v.strip())
    for v in names:
        if v not in ("device", "student"):
            raise pytest.UsageError(f"{VARIANTS_ENV}: unknown variant {v!r}; expected device and/or student")
    return names


def tiny_targets() -> tuple[str, ...]:
    return tuple(t.strip() for t in os.environ.get(TARGETS_ENV, "onnx").split(",") if t.strip())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "artifacts(target=, precision=, component=): which bundle artifacts a test is run on")
    config.addinivalue_line("markers", "needs_trained_family: skipped when the bundle's family has random weights")


def _planned_keys() -> list[tuple[str, str, str]]:
    """(target, precision, component) of every artifact the bundle under test has (or, for the tiny one, will have)."""
    folder = os.environ.get(BUNDLE_ENV)
    if not folder:
        return [(t, p, c) for t in tiny_targets() for p in TINY_PRECISIONS for c in TINY_COMPONENTS + TINY_CACHE_COMPONENTS]
    try:
        data = json.loads((Path(folder) / "manifest.json").read_text())
        return [(a["target"], a["precision"], a["component"]) for a in data["artifacts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # the manifest tests fail with the reason


def _wanted(value: str, spec: Any) -> bool:
    return spec is None or value == spec or (isinstance(spec, (tuple, list, set)) and value in spec)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "artifact_key" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("artifacts")
    want = dict(marker.kwargs) if marker else {}
    keys = [k for k in _planned_keys()
            if _wanted(k[0], want.get("target")) and _wanted(k[1], want.get("precision")) and _wanted(k[2], want.get("component"))]
    if keys:
        metafunc.parametrize("artifact_key", keys, ids=["/".join(k) for k in keys])
    else:
        what = ", ".join(f"{k}={v}" for k, v in want.items()) or "any"
        metafunc.parametrize("artifact_key", [pytest.param(None, marks=pytest.mark.skip(reason=f"the bundle has no artifacts with {what}"))],
                             ids=["none"])


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: one thread is far faster than two contending
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight tiny preset, with a student distilled from its device UNet for k = 3 of 10 (2 jumps, 12 updates)."""
    import torch

    from relaydiff.presets import build_preset
    from relaydiff.quantize.distill import DistillConfig, distill

    family = build_preset("tiny", tmp_path_factory.mktemp("device-tests") / "family", seed=0)
    if "student" in tiny_variants():
        torch.manual_seed(0)
        distill(DistillConfig(family=family, student_steps=2, batch_size=4, updates_per_batch=12, buffer_batches=1,
                              max_updates=12, lr=1e-3, warmup=1, ema_decay=0.0, threads=1, **TINY_RELAY), progress=False)
    return family


@pytest.fixture(scope="session", params=("given",) if os.environ.get(BUNDLE_ENV) else tiny_variants())
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[Path, Path | None]:
    """(bundle folder, family folder or None): the bundle under test, built here from the tiny preset when none is given."""
    folder = os.environ.get(BUNDLE_ENV)
    if folder:
        return Path(folder).resolve(), (Path(os.environ[FAMILY_ENV]) if os.environ.get(FAMILY_ENV) else None)
    from relaydiff.export.bundle import BundleConfig, build

    family = request.getfixturevalue("tiny_family")
    variant = None if request.param == "device" else request.param
    config = BundleConfig(family=family, out=tmp_path_factory.mktemp(f"bundle-{request.param}"), targets=tiny_targets(),
                          precisions=TINY_PRECISIONS, components=TINY_COMPONENTS, calibration_prompts=2, eval_prompts=1,
                          zip=False, device_variant=variant, cache=True, **TINY_RELAY)
    build(config, progress=False)
    return config.out, family


@pytest.fixture(scope="session")
def bundle_dir(built: tuple[Path, Path | None]) -> Path:
    return built[0]


@pytest.fixture(scope="session")
def manifest(bundle_dir: Path) -> dict[str, Any]:
    """The manifest's raw JSON: the checks read it independently of relaydiff's own Manifest records."""
    from relaydiff.runtime.bundle import read_manifest

    return read_manifest(bundle_dir)


@pytest.fixture(scope="session")
def typed_manifest(manifest: dict[str, Any]) -> Any:
    """The manifest as relaydiff reads it (validated against its schema), for the library calls the fixtures make."""
    from relaydiff.runtime.manifest import Manifest

    return Manifest.from_json(manifest)


@pytest.fixture(scope="session")
def family_dir(built: tuple[Path, Path | None], manifest: dict[str, Any], typed_manifest: Any) -> Path:
    """The bundle's family folder (its config hash is the manifest's), or a skip saying how to give it."""
    from relaydiff.runtime.bundle import find_family

    folder = find_family(built[0], typed_manifest, built[1])
    if folder is None:
        pytest.skip(f"the torch reference needs the bundle's family (id {manifest['family']['id']}); set {FAMILY_ENV}=DIR")
    return folder


@pytest.fixture(scope="session")
def pair(family_dir: Path, typed_manifest: Any) -> tuple[Any, Any]:
    """(host, device) loaded through relaydiff.core.family, with the variants the manifest names."""
    from relaydiff.export.bench import load_pair

    return load_pair(family_dir, typed_manifest)


@pytest.fixture(scope="session")
def relay_config(manifest: dict[str, Any]) -> Any:
    """Two held-out relays (prompt seed 1000, not the calibration prompts) at the bundle's k and N."""
    from relaydiff.quantize.parity import eval_config

    return eval_config(manifest["relay"]["relay_step"], manifest["relay"]["steps"], prompts=2)


@pytest.fixture(scope="session")
def recorded(pair: tuple[Any, Any], relay_config: Any) -> Any:
    """Component inputs recorded along real fp32 relays: unet_step at every device step [k, N), vae_decoder on the final latents."""
    from relaydiff.quantize.calibration import capture

    return capture(*pair, relay_config)


@pytest.fixture(scope="session")
def samples(recorded: Any) -> dict[str, list[dict[str, Any]]]:
    """Per component, the inputs the per-call checks use: 4 denoiser steps spread over both relays (first and last
    device steps included), and every final latent for the decoder."""
    import numpy as np

    steps = recorded.for_component("unet_step")
    picks = sorted({int(i) for i in np.linspace(0, len(steps) - 1, min(4, len(steps))).round()})
    return {"unet_step": [steps[i] for i in picks], "vae_decoder": list(recorded.for_component("vae_decoder"))}


@pytest.fixture()
def entry(artifact_key: tuple[str, str, str], manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of ``artifact_key``; a skip (with the build's reason) when the build skipped it."""
    target, precision, component = artifact_key
    for art in manifest["artifacts"]:
        if (art["target"], art["precision"], art["component"]) == artifact_key:
            return art
    for s in manifest.get("skipped", ()):
        if (s["target"], s["precision"], s.get("component")) == artifact_key:
            pytest.skip(f"the build skipped {target}/{precision}/{component}: {s['reason']}")
    pytest.fail(f"the manifest lists no {target}/{precision}/{component} artifact")


@pytest.fixture(scope="session")
def open_file(bundle_dir: Path) -> Callable[..., Any]:
    """open_file(entry, file=None) -> ArtifactSession, cached per file; a skip naming the reason where the runtime is absent."""
    from relaydiff.runtime.bundle import open_session
    from relaydiff.runtime.manifest import ArtifactEntry
    from relaydiff.runtime.sessions import RuntimeUnavailableError

    cache: dict[str, Any] = {}

    def get(entry: dict[str, Any], file: str | None = None) -> Any:
        file = file or entry["file"]
        if file not in cache:
            try:
                cache[file] = open_session(bundle_dir, ArtifactEntry.from_json(entry), file, allow_failed=True)
            except RuntimeUnavailableError as exc:
                pytest.skip(str(exc))
        return cache[file]

    return get
