"""The final round over a real loopback link: the host service refines the device's preview latent (RefineHandoff)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.controller import HostConfig, HostServer
from relaydiff.link import DeviceCapabilities
from relaydiff.link.config import LinkConfig
from relaydiff.preview.session import EditConfig, EditSession, LinkRefiner, LocalRefiner

TOKEN = "preview-token"
CAPS = DeviceCapabilities(("torch",), "preview-test", "ab" * 32, 50.0)
LINK = LinkConfig(open_timeout_s=3.0, handshake_timeout_s=3.0, recv_timeout_s=60.0, send_timeout_s=5.0, close_timeout_s=0.5)
CFG = EditConfig(steps=4, preview_steps=2, reuse_strength=0.5, refine_strength=0.5)


def serve_in_thread(server: HostServer) -> tuple[str, asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    url: list[str] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        url.append(loop.run_until_complete(server.start()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    return url[0], loop, thread


def test_final_over_the_link_matches_the_local_refiner(tiny_pair) -> None:
    host, device = tiny_pair
    server = HostServer(host, device, auth_token=TOKEN, config=HostConfig(link=LINK))
    url, loop, thread = serve_in_thread(server)
    try:
        remote = EditSession(device, CFG, refiner=LinkRefiner(url, auth_token=TOKEN, family_id=host.family_id,
                                                              capabilities=CAPS, config=LINK))
        local = EditSession(device, CFG, refiner=LocalRefiner(host))
        for s in (remote, local):
            s.preview("a red circle on the left")
            s.preview("a red square on the left")
        a, b = remote.final(), local.final()
        assert a.source == "host" and a.strength == 0.5 and a.host_calls == b.host_calls == 2 * 2
        assert np.array_equal(a.image, b.image)
        # a latent of another family is refused by the host, with both ids named
        wrong = LinkRefiner(url, auth_token=TOKEN, family_id="not-this-family", capabilities=CAPS, config=LINK)
        with pytest.raises(RelaydiffError, match="family_id is 'not-this-family'; this host's is"):
            wrong(remote.last.latents, "a red square on the left", 0.5, CFG)  # type: ignore[union-attr]
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_unreachable_host_gives_the_preview(tiny_pair) -> None:
    _, device = tiny_pair
    refiner = LinkRefiner("ws://127.0.0.1:9", auth_token=TOKEN, family_id="x", capabilities=CAPS, config=LINK, timeout_s=10)
    session = EditSession(device, CFG, refiner=refiner)
    session.preview("a red circle on the left")
    final = session.final()
    assert final.source == "preview" and "host unreachable" in final.note
