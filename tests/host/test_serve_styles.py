"""Host and device over the link (127.0.0.1) with the tiny SD3-style and SDXL-style families: a relayed request
is handed off and finished on the device, a host-only one decoded there, a state the device refuses is finished by
the host's fallback, and the ledger holds exactly one result per request (issue 15 item 4)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from relaydiff.core.relay import relay
from relaydiff.host.ledger import Source, digest_bytes, digest_latents
from relaydiff.runtime.client import DEVICE_ONLY, HOST_ONLY, RELAY
from relaydiff.runtime.device import encode_png
from relaydiff.runtime.settings import GenerationSettings

TOKEN = "link-test-token"  # the conftest's token
SAMPLER = {"sd3": "flow_euler", "sdxl": "euler"}  # each style's own sampler
STEPS = 4


def run(coro, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(params=["sd3", "sdxl"])
def style_pair(request, tiny_sd3_pair, tiny_sdxl_pair):  # type: ignore[no-untyped-def]
    """(style, (host, device)) for each family style."""
    return request.param, {"sd3": tiny_sd3_pair, "sdxl": tiny_sdxl_pair}[request.param]


def _settings(style: str) -> GenerationSettings:
    return GenerationSettings(steps=STEPS, sampler=SAMPLER[style], guidance_scale=4.0)


def _host(pair, settings, link_config, fraction: float, **config):  # type: ignore[no-untyped-def]
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.policy import FixedPolicy

    return HostServer(pair[0], pair[1], auth_token=TOKEN, policy=FixedPolicy(fraction),
                      config=HostConfig(settings=settings, link=link_config, **config))


def _client(device, url: str, settings, link_config):  # type: ignore[no-untyped-def]
    """A DeviceClient on ``device``: a loaded device model, or a DeviceRuntime to share."""
    from relaydiff.runtime.backends import TorchBackend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime

    runtime = device if isinstance(device, DeviceRuntime) else DeviceRuntime(TorchBackend(model=device))
    return DeviceClient(runtime, url, auth_token=TOKEN, settings=settings, link_config=link_config)


def _exactly_once(host) -> None:  # type: ignore[no-untyped-def]
    assert host.ledger.pending() == [] and host.ledger.refused == []
    assert all(e.completed_at is not None for e in host.ledger.entries())


def test_a_relayed_request_is_handed_off_and_finished_on_the_device(style_pair, link_config) -> None:  # type: ignore[no-untyped-def]
    style, pair = style_pair
    settings = _settings(style)
    host = _host(pair, settings, link_config, 0.5)

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            return await _client(pair[1], host.url, settings, link_config).generate("a red circle")

    out = run(main())
    assert (out.mode, out.relay_step, out.steps, out.fallback_reason) == (RELAY, 2, STEPS, None)
    assert np.array_equal(out.image, relay(*pair, settings.request("a red circle", 2)).images[0])  # the in-process relay
    (entry,) = host.ledger.entries()
    assert entry.source is Source.DEVICE and entry.result_sha256 == digest_bytes(encode_png(out.image))
    _exactly_once(host)


def test_a_host_only_request_is_decoded_on_the_device(style_pair, link_config) -> None:  # type: ignore[no-untyped-def]
    style, pair = style_pair
    settings = _settings(style)
    host = _host(pair, settings, link_config, 1.0)

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            return await _client(pair[1], host.url, settings, link_config).generate("a blue square")

    out = run(main())
    expected = relay(*pair, settings.request("a blue square", STEPS))
    assert (out.mode, out.relay_step, out.steps) == (HOST_ONLY, STEPS, STEPS)
    assert np.array_equal(out.image, expected.images[0])
    (entry,) = host.ledger.entries()
    assert entry.source is Source.HOST and entry.result_sha256 == digest_latents(expected.latents)
    _exactly_once(host)


def test_a_state_the_device_refuses_is_finished_by_the_host_fallback(style_pair, link_config) -> None:  # type: ignore[no-untyped-def]
    style, pair = style_pair
    settings = _settings(style)
    host = _host(pair, settings, link_config, 0.5)
    other = dataclasses.replace(pair[1], family_id="other-000000000000")  # the device model claiming another family

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            return await _client(other, host.url, settings, link_config).generate("a green triangle")

    out = run(main())
    assert out.mode == DEVICE_ONLY and "family_id differs" in (out.fallback_reason or "")
    (entry,) = host.ledger.entries()
    assert entry.source is Source.HOST_FALLBACK and entry.relay_step == 2
    # the host's fallback finished its own copy with the device model: the in-process relay's latent
    assert entry.result_sha256 == digest_latents(relay(*pair, settings.request("a green triangle", 2)).latents)
    _exactly_once(host)


def test_concurrent_requests_share_batched_host_steps_with_the_added_conditioning(style_pair, link_config) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.runtime.backends import TorchBackend
    from relaydiff.runtime.device import DeviceRuntime

    style, pair = style_pair
    settings = _settings(style)
    host = _host(pair, settings, link_config, 0.5, max_batch=3, batch_window_s=0.2)
    runtime = DeviceRuntime(TorchBackend(model=pair[1]))
    runtime.steps_per_second()  # measured once, before the clients connect at the same time
    prompts = [f"a red circle {i}" for i in range(3)]

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            clients = [_client(runtime, host.url, settings, link_config) for _ in prompts]
            return await asyncio.gather(*(c.generate(p) for c, p in zip(clients, prompts)))

    outcomes = run(main())
    assert [o.mode for o in outcomes] == [RELAY] * 3 and max(host.batch_sizes) > 1  # start_batch ran [uncond, cond] rows
    _exactly_once(host)
    for o in outcomes:  # batched host steps match the unbatched relay up to float rounding of the batched network
        alone = relay(*pair, settings.request(o.prompt, 2)).images[0]
        assert np.abs(o.image.astype(int) - alone.astype(int)).max() <= 1, o.prompt
