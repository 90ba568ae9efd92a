"""One tiny ONNX bundle per test session for the runtime tests (fp32 and int8; unet_step, vae_decoder, text_encoder,
and the cached-step pair at fp32; N = 10, k = 3), built from the tiny family the host fixtures use, so a host and the
bundle share a family id. It is tests/conftest.py's ``onnx_bundle``, which `bench device` tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

RELAY = {"relay_step": 3, "steps": 10}


def build_bundle(family: Path, out: Path, targets: tuple[str, ...], precisions: tuple[str, ...], components: tuple[str, ...]) -> Path:
    from relaydiff.export.bundle import BundleConfig, build

    config = BundleConfig(family=family, out=out, targets=targets, precisions=precisions, components=components,
                          calibration_prompts=2, eval_prompts=1, zip=False, **RELAY)
    build(config, progress=False)
    return out


@pytest.fixture(scope="session")
def bundle(onnx_bundle: Path) -> Path:
    import torch

    torch.set_num_threads(1)  # the runtime tests run the tiny models on one thread from here on, as before the bundle was shared
    return onnx_bundle


@pytest.fixture(scope="session")
def handoff(tiny_pair):  # type: ignore[no-untyped-def]
    """A host hand-off at the bundle's k and N, and the torch backend's final latent and image from it."""
    from relaydiff.core.relay import RelayRequest, start
    from relaydiff.runtime.backends import create_backend

    torch_backend = create_backend("torch", model=tiny_pair[1])
    state = start(tiny_pair[0], RelayRequest("a red circle on a blue field", guidance_scale=5.0, seed=3, **RELAY))
    latents = torch_backend.finish(state)
    return state, latents, torch_backend.decode(latents)
