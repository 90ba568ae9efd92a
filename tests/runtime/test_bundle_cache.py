"""A bundle with the cached-step pair (unet_step_full, unet_step_cached) finishes budgeted relays on onnxruntime:
exactly B full passes, the same latent as the torch device with the same budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaydiff.core.relay import RelayRequest, start
from relaydiff.runtime.backends import create_backend
from relaydiff.runtime.bundle import verify
from relaydiff.runtime.device import DeviceRuntime

RELAY = {"relay_step": 3, "steps": 10}


@pytest.fixture(scope="module")
def cache_bundle(bundle: Path) -> Path:
    """The session's tiny ONNX bundle (runtime_bundles), built with --cache: the cached-step pair at fp32."""
    return bundle


def test_the_bundle_lists_both_graphs_and_its_cache_section(cache_bundle: Path) -> None:
    manifest = json.loads((cache_bundle / "manifest.json").read_text())
    got = {a["component"]: a for a in manifest["artifacts"]}
    assert {"unet_step_full", "unet_step_cached"} <= set(got)
    assert [t["name"] for t in got["unet_step_full"]["outputs"]] == ["noise_pred", "deep_features"]
    assert got["unet_step_cached"]["inputs"][-1] == got["unet_step_full"]["outputs"][1]
    assert manifest["cache"] == {"mechanism": "reuse", "cache_branch": 0}  # the tiny family has no trained policy
    report = verify(cache_bundle)  # hashes, schema and parity of both graphs against the torch fixtures
    assert report.ok, report.problems
    rows = {r["component"]: r for r in report.parity}
    assert rows["unet_step_full"]["passed"] and rows["unet_step_cached"]["passed"]


def test_a_budgeted_relay_runs_b_full_passes_like_torch(cache_bundle: Path, tiny_pair) -> None:  # type: ignore[no-untyped-def]
    backend = create_backend("onnx", bundle_dir=cache_bundle)
    assert backend.cache is not None
    state = start(tiny_pair[0], RelayRequest("a red circle on a blue field", seed=3, cache_budget=3, **RELAY))
    latents = backend.finish(state)
    assert (backend.cache.step.full_calls, backend.cache.step.cached_calls) == (3, 7 - 3)
    ref = create_backend("torch", model=tiny_pair[1]).finish(state)
    assert float((latents - ref).abs().max()) < 1e-3
    uncached = backend.finish(state.__class__(**{**state.__dict__, "cache_budget": None}))
    assert float((latents - uncached).abs().max()) > 1e-4  # the cached steps did change the trajectory


def test_device_only_generation_honours_the_budget(cache_bundle: Path) -> None:
    backend = create_backend("onnx", bundle_dir=cache_bundle)
    runtime = DeviceRuntime(backend)
    out = runtime.generate(RelayRequest("a blue square", relay_step=0, steps=6, cache_budget=2))
    assert out.image.shape[-1] == 3 and backend.cache is not None and backend.cache.step.full_calls == 2


def test_bench_cache_prints_the_ratio(cache_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``relaydiff bench cache`` smoke test with tiny counts (the figures are measured on an idle machine, docs/cache.md)."""
    from relaydiff.cli import build_parser

    args = build_parser().parse_args(["bench", "cache", "--bundle", str(cache_bundle), "--repeats", "2", "--warmup", "0",
                                      "--relay-repeats", "1", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = [r for r in report["rows"] if r["target"] == "onnx"]
    assert row["cached_over_full"] == pytest.approx(row["cached_ms"] / row["full_ms"], rel=1e-2)
    assert row["budget"] == 4 and row["half_uncached_s"] > 0 and row["half_cached_s"] > 0  # 0.5 x (10 - 3), rounded
    assert any(s["target"] == "executorch" for s in report["skipped"])  # the bundle has no ExecuTorch graphs


@pytest.mark.parametrize("kwargs, message", [({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
                                             ({"budget_fraction": 0.0}, r"budget fraction 0.0 must lie in \(0, 1\]")])
def test_bench_cache_refuses_bad_settings(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    from relaydiff.core.errors import RelaydiffError
    from relaydiff.export.bench_cache import CacheBenchConfig, bench_cache

    with pytest.raises(RelaydiffError, match=message):
        CacheBenchConfig(bundle=tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(RelaydiffError, match="not a bundle folder"):
        bench_cache(CacheBenchConfig(bundle=tmp_path))
