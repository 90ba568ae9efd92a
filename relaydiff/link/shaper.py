"""Network emulation for demos and tests: a shaping TCP proxy on 127.0.0.1, or the reason ``tc netem`` cannot be used.

Real emulation (``tc qdisc ... netem`` on a veth pair in a network namespace) needs root and a kernel with
``sch_netem``; :func:`netem_unavailable_reason` probes for it. Where it is missing, :class:`ShapingProxy`
stands in: the device connects to the proxy, which forwards every byte to the host and back, delaying each
chunk by half the round-trip time plus its serialisation time at the current bandwidth (one FIFO per
direction, so a big hand-off delays what follows it, as on a real link). Conditions can change while links
are open (:meth:`ShapingProxy.set_conditions`), and :meth:`ShapingProxy.set_offline` drops every link and
refuses new ones. We write this proxy ourselves (about 100 lines of asyncio) because no maintained Python
package shapes a TCP stream in-process.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from relaydiff.core.errors import RelaydiffError

CHUNK = 64 * 1024  # bytes read per socket read


@dataclass(frozen=True)
class NetworkConditions:
    """One network regime: round-trip time and bandwidth (the same both ways)."""

    name: str  # shown in tables ("wifi", "4g", ...)
    rtt_ms: float  # round-trip time added by the link
    bandwidth_mbit_s: float  # link rate in Mbit/s

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise RelaydiffError(f"rtt_ms must be a finite number >= 0, got {self.rtt_ms!r}")
        if not (math.isfinite(self.bandwidth_mbit_s) and self.bandwidth_mbit_s > 0):
            raise RelaydiffError(f"bandwidth_mbit_s must be a finite number > 0, got {self.bandwidth_mbit_s!r}")

    def transfer_s(self, n_bytes: int) -> float:
        """One-way time of ``n_bytes``: half the RTT plus serialisation at the bandwidth."""
        return self.rtt_ms / 2000.0 + n_bytes * 8 / (self.bandwidth_mbit_s * 1e6)


def netem_unavailable_reason() -> str | None:
    """None when ``tc netem`` on a veth pair in a new network namespace works here; otherwise why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "tc netem needs root (network namespaces and qdiscs)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the ip/tc tools (iproute2) are not installed"
    ns, a, b = f"rdprobe{os.getpid()}", f"rdp{os.getpid()}a", f"rdp{os.getpid()}b"

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10)

    try:
        for cmd in (("ip", "netns", "add", ns), ("ip", "link", "add", a, "type", "veth", "peer", "name", b),
                    ("tc", "qdisc", "add", "dev", a, "root", "netem", "delay", "10ms")):
            r = run(*cmd)
            if r.returncode != 0:
                return f"`{' '.join(cmd[:4])} ...` failed: {(r.stderr or r.stdout).strip()[:200]}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probing tc netem failed: {exc}"
    finally:
        run("ip", "link", "del", a)
        run("ip", "netns", "del", ns)


class ShapingProxy:
    """A TCP proxy on 127.0.0.1 that adds latency and a bandwidth limit between a device and its host."""

    def __init__(self, target_host: str, target_port: int, conditions: NetworkConditions) -> None:
        self.target = (target_host, target_port)
        self.conditions = conditions
        self.offline = False
        self.bytes_forwarded = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RelaydiffError("the shaping proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def set_conditions(self, conditions: NetworkConditions) -> None:
        """New RTT and bandwidth for every byte read from now on."""
        self.conditions = conditions
        self.offline = False

    def set_offline(self) -> None:
        """Drop every open link and refuse new ones (until :meth:`set_conditions`)."""
        self.offline = True
        for w in list(self._writers):
            w.close()

    async def start(self) -> "ShapingProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "ShapingProxy":
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.offline:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction: each chunk leaves when the link would have delivered it."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)

        sender = asyncio.create_task(deliver())
        line_free = time.monotonic()  # when the link finishes serialising what is queued
        try:
            while data := await reader.read(CHUNK):
                if self.offline:
                    break
                c = self.conditions
                now = time.monotonic()
                line_free = max(line_free, now) + len(data) * 8 / (c.bandwidth_mbit_s * 1e6)
                await queue.put((line_free + c.rtt_ms / 2000.0, data))
        finally:
            await queue.put(None)
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            writer.close()
