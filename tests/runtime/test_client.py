"""DeviceClient against a real HostServer on 127.0.0.1: relayed, host-only and device-only images."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

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


class OtherFamily:
    """The tiny device backend claiming another family: it must refuse the host's relay states."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.name, self.bundle_id, self.bundle_sha256 = inner.name, inner.bundle_id, inner.bundle_sha256
        self.family_id = "other-000000000000"

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def test_a_state_the_device_cannot_use_is_finished_by_the_host(tiny_pair, device_runtime, make_host, link_config) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime

    host = make_host(fraction=0.5)
    other = DeviceRuntime(OtherFamily(device_runtime.backend))

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            c = DeviceClient(other, host.url, auth_token=TOKEN, settings=SETTINGS, link_config=link_config)
            return await c.generate_many(["a red circle", "a blue square"])

    outcomes = run(main())
    assert [o.mode for o in outcomes] == [DEVICE_ONLY, DEVICE_ONLY]
    assert all("this device runs 'other-000000000000'" in o.fallback_reason for o in outcomes)
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
