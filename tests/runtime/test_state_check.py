"""Every path that consumes a relay state runs the same compatibility check (relaydiff.core.family.check_state):
a state from a family whose VAE differs is refused by DeviceRuntime.finish and by the host's fallback, naming
each mismatched field with both values (``relaydiff resume`` is tested in tests/cli/test_cli_family_init.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relaydiff.core import family
from relaydiff.core.errors import CompatibilityError
from relaydiff.core.relay import start
from relaydiff.runtime.settings import GenerationSettings

SETTINGS = GenerationSettings(steps=4)


@pytest.fixture(scope="module")
def models(plain_pair: dict[str, Path]):  # type: ignore[no-untyped-def]
    """(host, its device, a device whose VAE differs) loaded from the plain pipeline folders."""
    host = family.load(family.resolve(plain_pair["host"], role="host"))
    device = family.load(family.resolve(plain_pair["device"], role="device"))
    bad = family.load(family.resolve(plain_pair["bad"], role="device"))
    return host, device, bad


def test_device_runtime_refuses_a_state_of_a_family_with_another_vae(models) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.device import DeviceRuntime

    host, device, bad = models
    state = start(host, SETTINGS.request("a red circle", 2))
    assert DeviceRuntime(create_backend("torch", model=device)).finish(state.to_bytes()).steps == 2  # its own family: fine
    with pytest.raises(CompatibilityError, match="family_id differs") as refused:
        DeviceRuntime(create_backend("torch", model=bad)).finish(state.to_bytes())
    assert refused.value.to_json() == [{"field": "family_id", "host": host.family_id, "device": bad.family_id}]


def test_check_state_names_every_field_with_both_values(models) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import torch

    host, _, bad = models
    state = start(host, SETTINGS.request("x", 2))
    odd = dataclasses.replace(state, scheduler_config={**state.scheduler_config, "beta_schedule": "linear"},
                              noise_schedule={**state.noise_schedule, "beta_schedule": "linear"},
                              latents=torch.zeros(1, 3, *state.latents.shape[2:]))
    with pytest.raises(CompatibilityError) as refused:
        family.check_state(bad, odd)
    fields = {m["field"]: (m["host"], m["device"]) for m in refused.value.to_json()}
    assert fields == {"family_id": (host.family_id, bad.family_id), "scheduler.beta_schedule": ("linear", "scaled_linear"),
                      "latent.channels": (3, 4)}


def test_the_host_fallback_refuses_a_state_its_fallback_model_cannot_continue(models, link_config) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.ledger import Source
    from relaydiff.host.policy import FixedPolicy
    from relaydiff.link.errors import ErrorCode
    from relaydiff.link.events import DeviceCapabilities, Error, GenerateRequest, Progress, RelayHandoff
    from relaydiff.link.transport import connect

    host_model, _, bad = models
    server = HostServer(host_model, bad, auth_token="state-check-token", policy=FixedPolicy(0.5),
                        config=HostConfig(settings=SETTINGS, link=link_config))

    async def main() -> None:
        async with server:
            link = await connect(server.url, auth_token="state-check-token", config=link_config,
                                 capabilities=DeviceCapabilities(("torch",), "state-check", "ab" * 32, 10.0))
            await link.send(GenerateRequest("r1", "a red circle", 0.5, 30.0))
            assert isinstance(await link.recv(), Progress) and isinstance(await link.recv(), RelayHandoff)
            await link.send(Error(ErrorCode.REQUEST_FAILED.value, "this device cannot", "r1"))  # the host falls back
            t0 = time.monotonic()
            while server.ledger.pending() and time.monotonic() - t0 < 20:
                await asyncio.sleep(0.05)
            await link.close("done")

    asyncio.run(asyncio.wait_for(main(), 40.0))
    (entry,) = server.ledger.entries()
    assert entry.source is Source.FAILED and "family_id differs" in (entry.error or "")
    assert repr(host_model.family_id) in entry.error and repr(bad.family_id) in entry.error
