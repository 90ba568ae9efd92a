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


def _constant(strength: float):  # type: ignore[no-untyped-def]
    """Predictors that always answer ``strength`` (zero coefficients): the test can tell them from a fixed strength."""
    from relaydiff.core.strength import REFINE_FEATURES, REUSE_FEATURES, LinearStrength, StrengthPredictors

    def model(names: tuple[str, ...]) -> LinearStrength:
        n = len(names)
        return LinearStrength(names, (0.0,) * n, (1.0,) * n, (0.0,) * n, strength, 0.0, 0.2)

    return StrengthPredictors(model(REFINE_FEATURES), model(REUSE_FEATURES), {})


def test_host_chooses_the_strength_when_the_handoff_leaves_it(tiny_pair) -> None:
    host, device = tiny_pair
    predictors = _constant(0.75)
    server = HostServer(host, device, auth_token=TOKEN, config=HostConfig(link=LINK), refine_predictors=predictors)
    bare = HostServer(host, device, auth_token=TOKEN, config=HostConfig(link=LINK))  # no predictors
    url, loop, thread = serve_in_thread(server)
    bare_url, bare_loop, bare_thread = serve_in_thread(bare)
    auto = EditConfig(steps=4, preview_steps=2, reuse_strength=0.5, refine_strength=None)
    try:
        remote = EditSession(device, auto, refiner=LinkRefiner(url, auth_token=TOKEN, family_id=host.family_id,
                                                               capabilities=CAPS, config=LINK))
        local = EditSession(device, auto, refiner=LocalRefiner(host, predictors, device=device))
        for s in (remote, local):
            s.preview("a red circle on the left")
            s.preview("a red square on the left")
        a, b = remote.final(), local.final()
        # s = 0.75 of N = 4: 3 CFG steps (6 UNet evals) and the probe's host call
        assert a.source == "host" and a.strength == b.strength == 0.75 and a.host_calls == b.host_calls == 2 * 3 + 1
        assert np.array_equal(a.image, b.image)
        # a host without predictors refuses a hand-off without a strength; the session keeps its preview
        refused = EditSession(device, auto, refiner=LinkRefiner(bare_url, auth_token=TOKEN, family_id=host.family_id,
                                                                capabilities=CAPS, config=LINK))
        refused.preview("a red circle on the left")
        final = refused.final()
        assert final.source == "preview" and "strength is absent and this host has no strength predictor" in final.note
        assert np.array_equal(final.image, refused.rounds[-1].image)
    finally:
        for srv, lp, th in ((server, loop, thread), (bare, bare_loop, bare_thread)):
            asyncio.run_coroutine_threadsafe(srv.close(), lp).result(30)
            lp.call_soon_threadsafe(lp.stop)
            th.join(30)
