"""One relay over the loopback link parses and validates its relay state exactly once: in the layer that consumes it."""

from __future__ import annotations

import asyncio

import pytest

from relaydiff.runtime.client import RELAY


def test_one_relay_over_the_link_validates_its_state_once(make_client, make_host, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.core import state as state_module

    calls: list[int] = []
    real = state_module.validate

    def counting(state):  # type: ignore[no-untyped-def]
        calls.append(state.step_index)
        return real(state)

    monkeypatch.setattr(state_module, "validate", counting)
    host = make_host(fraction=0.5)

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            return await make_client(host.url).generate("a red circle")

    out = asyncio.run(asyncio.wait_for(main(), 30.0))
    assert (out.mode, out.relay_step) == (RELAY, 2)
    print(f"validations in one hop: {len(calls)} (at steps {calls})")
    assert calls == [2], f"the relay state was validated {len(calls)} times (at steps {calls}); expected once, on the device"
