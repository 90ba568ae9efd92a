"""DeviceRuntime and the backend registry: device-only and relayed finishing match relaydiff.core.relay."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from relaydiff.core.errors import CompatibilityError, RelaydiffError
from relaydiff.core.relay import relay, start
from relaydiff.runtime.backends import BACKENDS, TorchBackend, create_backend
from relaydiff.runtime.device import decode_png, encode_png
from relaydiff.runtime.settings import GenerationSettings

SETTINGS = GenerationSettings(steps=4)


def test_generate_alone_matches_the_in_process_device_only_relay(tiny_pair, device_runtime) -> None:  # type: ignore[no-untyped-def]
    host, device = tiny_pair
    req = SETTINGS.request("a red circle", 0)
    out = device_runtime.generate(req)
    assert np.array_equal(out.image, relay(host, device, req).images[0])
    assert out.steps == 4 and set(out.timings) == {"encode_s", "device_s", "decode_s"}


def test_finish_matches_the_in_process_relay(tiny_pair, device_runtime) -> None:  # type: ignore[no-untyped-def]
    host, device = tiny_pair
    req = SETTINGS.request("a blue square", 3)
    out = device_runtime.finish(start(host, req))
    assert np.array_equal(out.image, relay(host, device, req).images[0]) and out.steps == 1


def test_finish_refuses_a_state_of_another_family(tiny_pair, device_runtime) -> None:  # type: ignore[no-untyped-def]
    state = replace(start(tiny_pair[0], SETTINGS.request("x", 2)), family_id="other-000000000000")
    with pytest.raises(CompatibilityError, match="family_id differs") as refused:
        device_runtime.finish(state)
    assert refused.value.to_json() == [{"field": "family_id", "host": "other-000000000000", "device": tiny_pair[1].family_id}]
    with pytest.raises(CompatibilityError, match="family_id differs"):  # the hand-off's bytes, parsed here, too
        device_runtime.finish(state.to_bytes())


def test_capabilities_describe_the_torch_backend(device_runtime) -> None:  # type: ignore[no-untyped-def]
    caps = device_runtime.capabilities()
    assert caps.runtimes == ("torch",) and 0 < caps.steps_per_second <= 10_000
    # the bundle id names the family by its content hash (the folder name is only a label) and the variant
    assert len(caps.bundle_sha256) == 64 and caps.bundle_id.startswith("fam-") and caps.bundle_id.endswith(":device")
    assert device_runtime.capabilities() == caps  # measured once, then remembered


def test_png_round_trip_is_lossless() -> None:
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data = encode_png(image)
    assert data.startswith(b"\x89PNG") and np.array_equal(decode_png(data), image)


def test_registry_knows_torch_and_builds_it(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    assert "torch" in BACKENDS
    backend = create_backend("torch", model=tiny_pair[1])
    assert isinstance(backend, TorchBackend) and backend.family_id == tiny_pair[1].family_id
