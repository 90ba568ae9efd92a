"""(e) Feature caching: ``unet_step_full`` and ``unet_step_cached`` against torch per call, and a budgeted relay on the bundle.

Per call (every runnable file, fp32 bar max abs <= 1e-3): the full graph on relay-drawn step inputs (noise
prediction and deep features), the cached graph on step i + 1's inputs with the torch full step's deep
features of step i (what a reuse schedule hands it). Whole relay: the bundle's backend with a cache budget
B against the torch device with the same budget and schedule (final latent max abs <= 1e-3), counting B
full passes. CoreML: the spec is checked by test_conformance_coreml.py; its runtime parity runs on macOS only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FP32_MAX_ABS = 1e-3


def _pairs(recorded: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(step i, step i + 1) inputs of consecutive device steps: the first, a middle and the last pair of the first relay."""
    steps = recorded.for_component("unet_step")
    per_relay = len(steps) // max(1, len(recorded.for_component("vae_decoder")))
    picks = sorted({0, max(0, per_relay // 2 - 1), max(0, per_relay - 2)})
    return [(steps[i], steps[i + 1]) for i in picks if i + 1 < per_relay]


def _check(entry: dict[str, Any], open_file: Callable[..., Any], inputs: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    from relaydiff.runtime.manifest import ArtifactEntry

    problems, figures = [], []
    for file in ArtifactEntry.from_json(entry).runnable_files():
        session = open_file(entry, file)
        for i, (x, ref) in enumerate(zip(inputs, refs, strict=True)):
            got = session(x)
            for name, want in ref.items():
                y = np.asarray(got[name])
                if y.shape != want.shape or not np.isfinite(y).all():
                    problems.append(f"{file} input {i} {name}: shape {y.shape} (want {want.shape})")
                    continue
                err = float(np.abs(y.astype(np.float64) - want).max())
                figures.append(err)
                if err > FP32_MAX_ABS:
                    problems.append(f"{file} input {i} {name}: max abs error {err:.3g} > {FP32_MAX_ABS:g}")
    assert figures and not problems, "\n".join(problems)


def _component(name: str, device: Any, manifest: dict[str, Any]) -> Any:
    from dataclasses import replace

    from relaydiff.export.components import component_for

    return replace(component_for(name, device), cache_branch=manifest["cache"]["cache_branch"])


@pytest.mark.artifacts(target=("onnx", "executorch"), precision="fp32", component="unet_step_full")
def test_full_graph_matches_torch(entry: dict[str, Any], pair: tuple[Any, Any], recorded: Any, manifest: dict[str, Any],
                                  open_file: Callable[..., Any]) -> None:
    full = _component("unet_step_full", pair[1], manifest)
    inputs = [a for a, _ in _pairs(recorded)]
    _check(entry, open_file, inputs, [full.reference(pair[1], x) for x in inputs])


@pytest.mark.artifacts(target=("onnx", "executorch"), precision="fp32", component="unet_step_cached")
def test_cached_graph_matches_torch(entry: dict[str, Any], pair: tuple[Any, Any], recorded: Any, manifest: dict[str, Any],
                                    open_file: Callable[..., Any]) -> None:
    full, cached = (_component(n, pair[1], manifest) for n in ("unet_step_full", "unet_step_cached"))
    inputs = [{**b, "deep_features": full.reference(pair[1], a)["deep_features"]} for a, b in _pairs(recorded)]
    _check(entry, open_file, inputs, [cached.reference(pair[1], x) for x in inputs])


@pytest.mark.artifacts(target=("onnx", "executorch"), precision="fp32", component="unet_step_cached")
def test_budgeted_relay_matches_torch(entry: dict[str, Any], pair: tuple[Any, Any], bundle_dir: Path, manifest: dict[str, Any]) -> None:
    from relaydiff.core.relay import RelayRequest, start
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.sessions import RuntimeUnavailableError

    k, n = manifest["relay"]["relay_step"], manifest["relay"]["steps"]
    budget = max(1, (n - k) // 2)
    try:
        backend = create_backend(entry["target"], bundle_dir=bundle_dir)
    except RuntimeUnavailableError as exc:
        pytest.skip(str(exc))
    state = start(pair[0], RelayRequest("a red circle left of a blue square", relay_step=k, steps=n, cache_budget=budget, seed=1))
    latents = backend.finish(state)
    assert backend.cache is not None and backend.cache.step.full_calls == budget
    ref = create_backend("torch", model=pair[1]).finish(state)  # the same schedule: the family's policy, else uniform
    err = float((latents - ref).abs().max())
    assert err <= FP32_MAX_ABS, f"budgeted relay: final latent max abs error {err:.3g} > {FP32_MAX_ABS:g}"


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML runs on macOS only (the spec is checked by test_conformance_coreml.py)")
@pytest.mark.artifacts(target="coreml", component=("unet_step_full", "unet_step_cached"))
def test_coreml_cache_graphs_match_torch(entry: dict[str, Any], pair: tuple[Any, Any], recorded: Any, manifest: dict[str, Any],
                                         open_file: Callable[..., Any]) -> None:
    full = _component("unet_step_full", pair[1], manifest)
    comp = _component(entry["component"], pair[1], manifest)
    inputs = [a if entry["component"] == "unet_step_full" else {**b, "deep_features": full.reference(pair[1], a)["deep_features"]}
              for a, b in _pairs(recorded)]
    tol = entry["tolerance"]
    session = open_file(entry)
    for x in inputs:
        got, want = session(x), comp.reference(pair[1], x)
        from relaydiff.core.metrics import psnr_db

        for name, ref in want.items():
            assert tol.get("min_psnr_db") is None or psnr_db(np.asarray(got[name]), ref) >= tol["min_psnr_db"]
            assert tol.get("max_abs") is None or float(np.abs(np.asarray(got[name]) - ref).max()) <= tol["max_abs"]
