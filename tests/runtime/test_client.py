"""DeviceClient against a real HostServer on 127.0.0.1: relayed, host-only and device-only images."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from relaydiff.link.events import PROTOCOL_VERSION
from relaydiff.core.relay import relay
from relaydiff.host.ledger import Source
from relaydiff.link.errors import PeerError
from relaydiff.runtime.client import DEVICE_ONLY, HOST_ONLY, RELAY
from relaydiff.host.ledger import digest_bytes
from relaydiff.runtime.device import decode_png, encode_png
from relaydiff.runtime.settings import GenerationSettings

SETTINGS = GenerationSettings(steps=4)
TOKEN = "link-test-token"  # the conftest's token


def run(coro, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_relay_over_loopback_gives_the_in_process_image(tiny_pair, make_client, make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=0.5)
    feedback = []

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            c = make_client(host.url, quality_fn=lambda image, prompt: feedback.append(prompt) or 0.75)
            return await c.generate_many(["a red circle", "two blue squares"])

    outcomes = run(main())
    for out in outcomes:
        assert (out.mode, out.relay_step, out.steps, out.fallback_reason) == (RELAY, 2, 4, None)
        expected = relay(*tiny_pair, SETTINGS.request(out.prompt, 2)).images[0]
        assert np.array_equal(out.image, expected)
    entries = host.ledger.entries()
    assert [e.source for e in entries] == [Source.DEVICE, Source.DEVICE] and host.ledger.refused == []
    assert all(e.result_sha256 == digest_bytes(encode_png(o.image)) for e, o in zip(entries, outcomes))  # the ledger keeps digests
    assert [e.feedback.quality for e in entries] == [0.75, 0.75] and feedback == ["a red circle", "two blue squares"]


def test_host_only_result_is_decoded_on_the_device(tiny_pair, make_client, make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host(fraction=1.0)

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            return await make_client(host.url, steps=7).generate("a green triangle")  # the host's N wins

    out = run(main())
    assert (out.mode, out.relay_step, out.steps) == (HOST_ONLY, 4, 4)
    assert np.array_equal(out.image, relay(*tiny_pair, SETTINGS.request("a green triangle", 4)).images[0])
    (entry,) = host.ledger.entries()
    assert entry.source is Source.HOST and "host_s" in entry.timings


def test_unreachable_host_means_device_only(tiny_pair, make_client) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run(make_client(f"ws://127.0.0.1:{port}/").generate("a red circle"))
    assert (out.mode, out.relay_step, out.steps) == (DEVICE_ONLY, 0, 4)
    assert "unreachable" in out.fallback_reason
    assert np.array_equal(out.image, relay(*tiny_pair, SETTINGS.request("a red circle", 0)).images[0])


def test_wrong_token_is_an_error_not_a_fallback(make_client, make_host) -> None:  # type: ignore[no-untyped-def]
    host = make_host()

    async def main() -> None:
        async with host:
            await make_client(host.url, token="wrong").generate("x")

    with pytest.raises(PeerError, match="auth_failed"):
        run(main())
    assert len(host.ledger) == 0


def test_a_state_the_device_cannot_use_is_finished_by_the_host(tiny_pair, device_runtime, make_host, link_config) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from relaydiff.runtime.backends import TorchBackend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime

    host = make_host(fraction=0.5)
    # the tiny device model claiming another family: it must refuse the host's relay states
    other = DeviceRuntime(TorchBackend(model=dataclasses.replace(tiny_pair[1], family_id="other-000000000000")))

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            c = DeviceClient(other, host.url, auth_token=TOKEN, settings=SETTINGS, link_config=link_config)
            return await c.generate_many(["a red circle", "a blue square"])

    outcomes = run(main())
    assert [o.mode for o in outcomes] == [DEVICE_ONLY, DEVICE_ONLY]
    assert all("family_id differs" in o.fallback_reason and "'other-000000000000'" in o.fallback_reason for o in outcomes)
    assert [e.source for e in host.ledger.entries()] == [Source.HOST_FALLBACK, Source.HOST_FALLBACK]
    assert host.ledger.pending() == [] and host.ledger.refused == []


def test_a_busy_host_is_asked_again_after_its_retry_after(make_client, make_host, link_config) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    from relaydiff.link.events import DeviceCapabilities, GenerateRequest, RelayHandoff, Result, ResultKind
    from relaydiff.link.transport import connect

    host = make_host(fraction=0.5, max_queue=1, busy_retry_after_s=0.4)
    caps = DeviceCapabilities(("torch",), "queue-holder", "ab" * 32, 100.0)

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            holder = await connect(host.url, auth_token=TOKEN, capabilities=caps, config=link_config)
            await holder.send(GenerateRequest("hold", "a red circle", 0.5, 30.0))
            while not isinstance(await holder.recv(), RelayHandoff):
                pass  # the host's only slot is taken until the holder answers

            async def release() -> None:
                await asyncio.sleep(0.6)
                buf = io.BytesIO()
                Image.new("RGB", (4, 4)).save(buf, format="PNG")
                await holder.send(Result("hold", ResultKind.PNG, buf.getvalue()))

            outcome, _ = await asyncio.gather(make_client(host.url, deadline_s=20.0).generate("a blue square"), release())
            await holder.close()
            return outcome

    outcome = run(main())
    assert outcome.mode == RELAY and outcome.fallback_reason is None
    assert host.stats.busy >= 1 and host.stats.accepted == 2


def _fake_host_run(make_client, link_config, answer):  # type: ignore[no-untyped-def]
    """A host that answers the device's GenerateRequest with ``answer(link, request_id)`` (raw frames allowed),
    then records every event the device sends until it leaves. Returns (device outcome, events seen)."""
    from relaydiff.link.events import GenerateRequest
    from relaydiff.link.transport import LinkClosed, serve

    seen: list = []  # type: ignore[type-arg]

    async def handler(link) -> None:  # type: ignore[no-untyped-def]
        request = await link.recv()
        assert isinstance(request, GenerateRequest)
        await answer(link, request.request_id)
        try:
            while True:
                seen.append(await link.recv(timeout=20))
        except (LinkClosed, Exception):
            return

    async def main():  # type: ignore[no-untyped-def]
        async with await serve(handler, auth_token=TOKEN, config=link_config) as server:
            outcome = await make_client(server.url, deadline_s=20.0).generate("a red circle")
            await asyncio.sleep(0.1)
            return outcome

    return run(main()), seen


@pytest.mark.parametrize("name", ["zero-size latent", "bogus timestep_spacing", "junk generator state", "2M-step grid",
                                  "guidance NaN", "1-channel latent"])
def test_a_semantically_bad_hand_off_makes_the_device_fall_back_and_tell_the_host(tiny_pair, make_client, link_config, name) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    from relay_state_crafting import SEMANTIC, crafted
    from relaydiff.core.relay import start
    from relaydiff.link import wire
    from relaydiff.link.events import Error, Progress, RelayHandoff

    base = start(tiny_pair[0], SETTINGS.request("a red circle", 2)).to_bytes()
    if name == "1-channel latent":  # valid on its own; the device model has 4 channels
        change, phrase = (lambda t, m: t.update(latents=t["latents"][:, :1].contiguous())), "1 channels; the device UNet expects"
    else:
        change, phrase = SEMANTIC[name]
    blob = crafted(base, change)

    async def answer(link, request_id: str) -> None:  # type: ignore[no-untyped-def]
        await link.send(Progress(request_id, 2, 4))
        body = _json.dumps({"request_id": request_id}).encode()
        await link.websocket.send(wire.HEADER.pack(wire.MAGIC, PROTOCOL_VERSION, RelayHandoff.TYPE_CODE, len(body), len(blob)) + body + blob)

    outcome, seen = _fake_host_run(make_client, link_config, answer)
    assert outcome.mode == DEVICE_ONLY and outcome.image.shape == (16, 16, 3)
    errors = [e for e in seen if isinstance(e, Error)]
    assert errors, f"the device told the host nothing: {seen}"
    assert any(phrase.replace("\\", "") in e.message for e in errors), [e.message for e in errors]
    assert errors[0].code in ("bad_relay_state", "request_failed")


def test_a_decompression_bomb_png_from_the_host_makes_the_device_fall_back(make_client, link_config) -> None:  # type: ignore[no-untyped-def]
    from relay_state_crafting import png_header_only
    from relaydiff.link.events import Error, Result, ResultKind

    async def answer(link, request_id: str) -> None:  # type: ignore[no-untyped-def]
        await link.send(Result(request_id, ResultKind.PNG, png_header_only(5000, 5000)))

    outcome, seen = _fake_host_run(make_client, link_config, answer)
    assert outcome.mode == DEVICE_ONLY and "cannot use the host's result" in (outcome.fallback_reason or "")
    (error,) = [e for e in seen if isinstance(e, Error)]
    assert error.code == "request_failed" and "5000x5000 = 25000000 pixels; the cap is 16777216" in error.message
