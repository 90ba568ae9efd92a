"""The reverse hand-off (protocol 2): caps, validation and exactly-once accounting, in memory and over a loopback link."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from safetensors.torch import save

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.state import latents_from_bytes, latents_to_bytes
from relaydiff.link import (
    Close,
    Connection,
    DeviceCapabilities,
    ErrorCode,
    LocalProtocolError,
    RefineHandoff,
    RefineResult,
    RemoteProtocolError,
    RequestState,
    Role,
    State,
    wire,
)
from relaydiff.link.config import LinkConfig
from relaydiff.link.events import MAX_LATENT_BYTES
from relaydiff.link.transport import Link, connect, serve

TOKEN = "refine-token"
CAPS = DeviceCapabilities(("torch",), "tiny-device", "ab" * 32, 20.0)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
FIELDS = {"family_id": "tiny", "prompt": "a red circle on the left", "steps": 8, "sampler": "ddim", "guidance_scale": 5.0,
          "seed": 0}
LAT = torch.ones(1, 4, 8, 8)


def _handoff(request_id: str, latents: torch.Tensor, **fields: object) -> RefineHandoff:
    return RefineHandoff(request_id=request_id, latent=latents_to_bytes(latents), **fields)  # type: ignore[arg-type]


def pair() -> tuple[Connection, Connection]:
    device, host = Connection(Role.DEVICE, auth_token=TOKEN), Connection(Role.HOST, auth_token=TOKEN)
    host.receive_data(device.send(device.hello(CAPS)))
    host.next_event()
    device.receive_data(host.send(host.hello_ack("s")))
    device.next_event()
    return device, host


@pytest.mark.parametrize("bad, match", [
    ({"strength": 0.0}, r"strength is 0.0; expected"),
    ({"strength": 1.5}, r"strength is 1.5; expected"),
    ({"prompt": "   "}, r"prompt is '   '; expected a non-empty prompt"),
    ({"steps": 0}, r"steps is 0; expected an integer in \[1, 1000\]"),
])
def test_bad_fields_are_refused_with_the_value(bad: dict[str, object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        _handoff("r", LAT, **{**FIELDS, **bad})


@pytest.mark.parametrize("blob, match", [
    (b"not safetensors", "not a safetensors buffer"),
    (save({"latents": torch.ones(4, 8, 8)}), r"expected a 4-D float tensor"),
    (save({"latents": torch.full((1, 4, 8, 8), math.nan)}), "NaN or Inf"),
    (save({"latents": LAT, "extra": LAT.clone()}), r"expected exactly \['latents'\]"),
])
def test_bad_latent_blobs_are_carried_and_refused_by_the_consumer(blob: bytes, match: str) -> None:
    handoff = RefineHandoff(request_id="r", latent=blob, **FIELDS)  # type: ignore[arg-type]  # the link carries bytes
    with pytest.raises(RelaydiffError, match=match):
        latents_from_bytes(handoff.latent)  # the host parses and checks them once


def test_latent_cap() -> None:
    with pytest.raises(LocalProtocolError, match=f"the cap is {MAX_LATENT_BYTES}"):
        RefineHandoff(request_id="r", latent=b"\x00" * (MAX_LATENT_BYTES + 1), **FIELDS)


def test_exactly_once_and_direction() -> None:
    device, host = pair()
    host.receive_data(device.send(_handoff("r1", LAT, **FIELDS)))
    assert isinstance(host.next_event(), RefineHandoff) and host.request_state("r1") is RequestState.REFINING
    device.receive_data(host.send(RefineResult("r1", 0.5, 8, PNG)))
    assert isinstance(device.next_event(), RefineResult) and device.request_state("r1") is RequestState.DONE
    # a second result for the same request is refused on the sending side
    with pytest.raises(LocalProtocolError, match="RefineResult for request 'r1' in request state DONE"):
        host.send(RefineResult("r1", 0.5, 8, PNG))
    # a reused id is refused, a host cannot send a RefineHandoff, a device cannot send a RefineResult
    d2, h2 = pair()
    h2.receive_data(d2.send(_handoff("r1", LAT, **FIELDS)))
    h2.next_event()
    h2.receive_data(wire.encode(_handoff("r1", LAT, **FIELDS)))
    with pytest.raises(RemoteProtocolError) as info:
        h2.next_event()
    assert info.value.code is ErrorCode.UNKNOWN_REQUEST and h2.state is State.ERROR
    d3, h3 = pair()
    with pytest.raises(LocalProtocolError, match="sent by the host only"):
        d3.send(RefineResult("x", 0.5, 1, PNG))
    with pytest.raises(LocalProtocolError, match="sent by the device only"):
        h3.send(_handoff("x", LAT, **FIELDS))


def test_open_request_cap_counts_refines() -> None:
    device, _ = Connection(Role.DEVICE, auth_token=TOKEN, config=LinkConfig(max_open_requests=1)), None
    host = Connection(Role.HOST, auth_token=TOKEN)
    host.receive_data(device.send(device.hello(CAPS)))
    host.next_event()
    device.receive_data(host.send(host.hello_ack("s")))
    device.next_event()
    device.send(_handoff("a", LAT, **FIELDS))
    with pytest.raises(LocalProtocolError) as info:
        device.send(_handoff("b", LAT, **FIELDS))
    assert info.value.code is ErrorCode.TOO_MANY_REQUESTS


def test_reverse_handoff_over_a_loopback_link() -> None:
    config = LinkConfig(handshake_timeout_s=2.0, recv_timeout_s=5.0, send_timeout_s=5.0, close_timeout_s=0.5)

    async def host(link: Link) -> None:
        while True:
            event = await link.recv()
            if isinstance(event, RefineHandoff):  # a toy host: echoes the strength, reports the latent's sum as cost
                await link.send(RefineResult(event.request_id, event.strength or 1.0, int(latents_from_bytes(event.latent).sum()), PNG))
            elif isinstance(event, Close):
                return

    async def main() -> None:
        async with await serve(host, auth_token=TOKEN, config=config) as server:
            link = await connect(server.url, auth_token=TOKEN, capabilities=CAPS, config=config)
            await link.send(_handoff("rv-1", LAT, **FIELDS, strength=0.3))
            got = await link.recv()
            assert isinstance(got, RefineResult) and got.request_id == "rv-1"
            assert got.strength == 0.3 and got.host_unet_evals == int(LAT.sum()) and got.data == PNG
            await link.close("done")

    asyncio.run(asyncio.wait_for(main(), 20.0))
