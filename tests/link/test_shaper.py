"""The in-process network shaper: it adds the RTT and the serialisation delay it is told to, and can go offline."""

from __future__ import annotations

import asyncio
import time

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.shaper import NetworkConditions, ShapingProxy


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _round_trip(port: int, payload: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = b""
    while len(got) < len(payload):
        got += await reader.read(65536)
    seconds = time.monotonic() - t0
    writer.close()
    assert got == payload  # every byte arrives, in order
    return seconds


def test_the_proxy_adds_rtt_and_serialisation_time_and_forwards_every_byte() -> None:
    async def main() -> tuple[float, float, float, int]:
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        async with ShapingProxy("127.0.0.1", port, NetworkConditions("slow", 120.0, 1000.0)) as proxy:
            small = await _round_trip(proxy.port, b"x" * 10)
            proxy.set_conditions(NetworkConditions("narrow", 0.0, 4.0))  # 4 Mbit/s: 50 kB takes 0.1 s each way
            big = await _round_trip(proxy.port, bytes(range(256)) * 200)
            forwarded = proxy.bytes_forwarded
        direct = await _round_trip(port, b"x" * 10)
        server.close()
        return small, big, direct, forwarded

    small, big, direct, forwarded = asyncio.run(asyncio.wait_for(main(), 20))
    assert small >= 0.12  # the whole RTT, half each way
    assert big >= 2 * 51200 * 8 / 4e6  # serialised at 4 Mbit/s on the way there and back
    assert direct < small
    assert forwarded == 2 * (10 + 51200)


def test_offline_refuses_new_links_and_drops_open_ones() -> None:
    async def main() -> tuple[bytes, bytes]:
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        async with ShapingProxy("127.0.0.1", port, NetworkConditions("wifi", 2.0, 100.0)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hello")
            first = await reader.read(5)
            proxy.set_offline()
            dropped = await asyncio.wait_for(reader.read(5), 5)  # EOF: the proxy closed the link
            r2, _ = await asyncio.open_connection("127.0.0.1", proxy.port)
            refused = await asyncio.wait_for(r2.read(5), 5)
        server.close()
        return first + dropped, refused

    got, refused = asyncio.run(asyncio.wait_for(main(), 20))
    assert got == b"hello" and refused == b""


@pytest.mark.parametrize(("rtt", "bw", "match"), [(-1.0, 10.0, "rtt_ms"), (float("nan"), 10.0, "rtt_ms"),
                                                  (10.0, 0.0, "bandwidth_mbit_s"), (10.0, float("inf"), "bandwidth_mbit_s")])
def test_bad_conditions_are_refused(rtt: float, bw: float, match: str) -> None:
    with pytest.raises(RelaydiffError, match=match):
        NetworkConditions("bad", rtt, bw)


def test_transfer_time_is_half_rtt_plus_serialisation() -> None:
    c = NetworkConditions("4g", 60.0, 12.0)
    assert c.transfer_s(1_500_000) == pytest.approx(0.03 + 1.0)
