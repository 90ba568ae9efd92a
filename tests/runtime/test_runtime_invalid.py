"""Invalid inputs to the device runtime: unknown backends, wrong types, bad settings."""

from __future__ import annotations

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.backends import create_backend, register_backend
from relaydiff.runtime.client import DeviceClient
from relaydiff.runtime.device import DeviceRuntime, encode_png
from relaydiff.runtime.settings import GenerationSettings


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(RelaydiffError, match=r"unknown device backend 'coreml'; known backends: .*torch"):
        create_backend("coreml")


def test_a_backend_name_registers_once() -> None:
    with pytest.raises(RelaydiffError, match="'torch' is already registered"):
        register_backend("torch")(object)  # type: ignore[arg-type]


def test_torch_backend_takes_a_model_or_a_folder_not_both(tiny_pair, tiny_family) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="either model= or family_dir="):
        create_backend("torch", model=tiny_pair[1], family_dir=tiny_family)


def test_runtime_needs_a_backend() -> None:
    with pytest.raises(TypeError, match="got str"):
        DeviceRuntime("torch")  # type: ignore[arg-type]


def test_client_needs_a_runtime_and_valid_preferences(device_runtime) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="DeviceRuntime"):
        DeviceClient(object(), "ws://127.0.0.1:1/", auth_token="t")  # type: ignore[arg-type]
    with pytest.raises(RelaydiffError, match="1.5"):
        DeviceClient(device_runtime, "ws://127.0.0.1:1/", auth_token="t", quality_preference=1.5)
    with pytest.raises(RelaydiffError, match="deadline_s"):
        DeviceClient(device_runtime, "ws://127.0.0.1:1/", auth_token="t", deadline_s=0.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"sampler": "plms"}, "unknown scheduler 'plms'"),
    ({"guidance_scale": -1.0}, "guidance scale must be a finite number >= 0, got -1.0"),
])
def test_bad_generation_settings_are_refused(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RelaydiffError, match=match):
        GenerationSettings(**kwargs)


def test_encode_png_refuses_non_images() -> None:
    import numpy as np

    with pytest.raises(RelaydiffError, match="uint8 image"):
        encode_png(np.zeros((4, 4), dtype=np.float32))
