"""``relaydiff bench attack``: the abuse of issue 19 on a loopback host while one honest device runs a stream.

The host (:class:`~relaydiff.host.controller.HostServer`) runs in this process, so its resident memory
is this process's; every client (the honest device and the attackers) runs in one child process, so
that the attackers' own buffers do not count as host memory. Phases:

1. **unloaded**: the honest device sends ``honest_requests`` requests, one after the other (each over a
   fresh link, as :meth:`~relaydiff.runtime.client.DeviceClient.generate` does);
2. **attack**: the honest stream goes on while, all at once,

   - *work amplification*: waves of ``links`` links x ``requests_per_link`` requests (deadline one hour),
     every link aborted at once (no Close) as soon as the host has admitted or refused them;
   - *oversize results*: a link answers each hand-off with a ``oversize_bytes`` "PNG" (the signature, then
     junk), ``oversize_results`` times;
   - *pre-Hello frames*: ``pre_hello_frames`` raw WebSocket connections each send one ``pre_hello_bytes``
     frame before any Hello;
   - *reused request ids*: a link reuses one request id after each Feedback;
   - *login guessing*: ``guesses`` Hellos with wrong tokens, from another loopback address (127.0.0.2) so
     that the failed-login lockout does not lock out the honest device;

   until the host has accepted ``accepted`` requests during this phase (then the child is told to stop);
3. **after**: the host drains, and its RSS is read again.

The attackers present a token of their own (host client ``attackers``; the honest device's is client
``default``) unless ``attackers_share_token``: then all of them are one client to the host, which can
then share work only per link (the report's ``identity`` says which, and what that means).

Reported: the honest device's p50/p95 latency unloaded vs under attack (their ratios; target p95 within
2x), whether it ever fell back to device-only (target: never), host RSS at start of the attack, peak and
after (target: after within 50 MB of start), and two invariants checked over every request accepted in
the attack phase: each got exactly one result in the ledger (accepted keys are counted as they enter,
results as they are recorded, doubled completions are counted too), each request on a link that stayed
open got exactly one answer on the wire, and the ledger's completed entries never exceeded
``ledger_max_entries`` (nor its pending ones the queue cap). Timings depend on the machine and its load;
the invariants must hold under any load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from relaydiff.core.errors import RelaydiffError

TOKEN = "bench-attack-token-0123456789"  # the honest device's (client "default")
ATTACKER_TOKEN = "bench-attack-attackers-token-0123"  # the attackers' own (client ATTACKER_CLIENT), unless they share TOKEN
ATTACKER_CLIENT = "attackers"
MIB = 1024 * 1024
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackBenchConfig:
    """What ``relaydiff bench attack`` runs; the defaults are the issue's attack."""

    family: Path | None = None  # family folder; None: the embedded default
    steps: int = 8  # N of every request
    fraction: float = 0.5  # the host relays at k = round(fraction x N)
    honest_requests: int = 20  # the honest device's requests unloaded (and at least as many under attack)
    links: int = 20  # work amplification: links per wave
    requests_per_link: int = 16  # work amplification: requests each link sends before it is aborted
    accepted: int = 1000  # the attack phase ends once the host has accepted this many requests in it
    oversize_results: int = 20  # device Results of oversize_bytes sent in answer to hand-offs
    oversize_bytes: int = 15 * MIB  # size of each such "PNG" (below the 16 MiB message cap, so the host must read it)
    pre_hello_frames: int = 5  # raw connections sending one big frame before the Hello
    pre_hello_bytes: int = 15 * MIB
    guesses: int = 200  # Hellos with wrong tokens
    max_queue: int = 64  # the host's global queue cap (HostConfig.max_queue)
    max_per_device: int = 4  # the host's per-link quota (HostConfig.max_requests_per_session)
    max_per_client: int | None = None  # the host's per-client quota (HostConfig.max_requests_per_client)
    attackers_share_token: bool = False  # the attackers hold the honest device's token (one client) instead of their own
    ledger_max_entries: int = 200  # the ledger's bound on completed entries
    honest_deadline_s: float = 60.0  # the honest device's deadline per request
    timeout_s: float = 1800.0  # the whole run is abandoned past this

    def __post_init__(self) -> None:
        for name in ("steps", "honest_requests", "links", "requests_per_link", "accepted", "oversize_results",
                     "oversize_bytes", "pre_hello_frames", "pre_hello_bytes", "guesses", "max_queue", "max_per_device",
                     "ledger_max_entries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RelaydiffError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < self.fraction < 1.0:
            raise RelaydiffError(f"fraction must be in (0, 1), got {self.fraction!r}")
        if self.oversize_bytes >= 16 * MIB - 64 * 1024:
            raise RelaydiffError(f"oversize_bytes must stay below the 16 MiB message cap minus 64 KiB, got {self.oversize_bytes}")
        for name in ("honest_deadline_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise RelaydiffError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.max_per_client is not None and (isinstance(self.max_per_client, bool) or not isinstance(self.max_per_client, int)
                                                or self.max_per_client < 1):
            raise RelaydiffError(f"max_per_client must be a positive integer, got {self.max_per_client!r}")
        if self.family is not None and not Path(self.family).is_dir():
            raise RelaydiffError(f"family folder {str(self.family)!r} does not exist")

    @classmethod
    def quick(cls, family: Path | None = None, *, attackers_share_token: bool = False) -> AttackBenchConfig:
        """Small counts (a test's run): every attack kind still runs, the lockout and both caps are reached."""
        return cls(family=family, steps=3, honest_requests=2, links=4, requests_per_link=6, accepted=40, oversize_results=2,
                   oversize_bytes=256 * 1024, pre_hello_frames=2, pre_hello_bytes=1 * MIB, guesses=7, max_queue=10,
                   max_per_device=4, ledger_max_entries=15, timeout_s=600.0, attackers_share_token=attackers_share_token)


def rss_bytes() -> int:
    """This process's resident set size (psutil when installed, else /proc/self/status; 0 when neither works)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ratio(a: Any, b: Any) -> float | None:
    """a / b, or None where either is missing (no requests in a phase) or b is 0."""
    return float(a) / float(b) if a is not None and b else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


# ----------------------------------------------------------------------------- the host side (this process)


class _Watch:
    """Counts, on the host's own ledger, what was accepted and completed (and completed twice), and its size."""

    def __init__(self, server: Any) -> None:
        self.ledger = server.ledger
        self.accepted: Counter[str] = Counter()  # a key may be accepted again: a request id reused after its Feedback
        self.completions: Counter[str] = Counter()
        self.counting = False
        self.max_completed = 0
        self.max_pending = 0
        accept, complete = self.ledger.accept, self.ledger.complete

        def counted_accept(key: str, prompt: str) -> Any:
            entry = accept(key, prompt)
            if self.counting:
                self.accepted[key] += 1
            return entry

        def counted_complete(key: str, source: Any, **kw: Any) -> bool:
            recorded = complete(key, source, **kw)
            if key in self.accepted:
                self.completions[key] += 1 if recorded else 0
                if not recorded:
                    self.completions[key + " (refused second result)"] += 1
            self.sample()
            return recorded

        self.ledger.accept, self.ledger.complete = counted_accept, counted_complete

    def sample(self) -> None:
        pending = len(self.ledger.pending())
        self.max_pending = max(self.max_pending, pending)
        self.max_completed = max(self.max_completed, len(self.ledger) - pending)


async def _run(config: AttackBenchConfig, family_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from relaydiff.core import family
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.policy import FixedPolicy
    from relaydiff.link import LinkConfig
    from relaydiff.runtime.settings import GenerationSettings

    torch.set_num_threads(1)
    host_model = family.load(family.resolve(family_dir, None, role="host"))
    device_model = family.load(family.resolve(family_dir, None, role="device"), share_with=host_model)
    host_config = HostConfig(
        settings=GenerationSettings(steps=config.steps), max_queue=config.max_queue,
        max_requests_per_session=config.max_per_device, max_requests_per_client=config.max_per_client,
        ledger_max_entries=config.ledger_max_entries,
        result_timeout_s=120.0, link=LinkConfig(recv_timeout_s=600.0, send_timeout_s=60.0),
    )
    server = HostServer(host_model, device_model, auth_token=TOKEN, policy=FixedPolicy(config.fraction), config=host_config,
                        client_tokens=None if config.attackers_share_token else {ATTACKER_CLIENT: ATTACKER_TOKEN})
    watch = _Watch(server)
    rss: dict[str, float] = {}
    async with server:
        spec = {"url": server.url, "family": str(family_dir), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                                          for k, v in asdict(config).items()}}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relaydiff.host.attack", "--clients-worker", json.dumps(spec),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        report: dict[str, Any] | None = None
        accepted_before = 0
        peak = 0.0
        monitor: asyncio.Task[None] | None = None

        async def watch_attack() -> None:  # RSS and ledger size every 20 ms; stop the attack at the accepted target
            nonlocal peak
            told = False
            while True:
                peak = max(peak, rss_bytes())
                watch.sample()
                if not told and server.stats.accepted - accepted_before >= config.accepted:
                    assert proc.stdin is not None
                    proc.stdin.write(b"stop\n")
                    await proc.stdin.drain()
                    told = True
                    say(f"the host accepted {config.accepted} requests under attack: stopping the attack")
                await asyncio.sleep(0.02)

        try:
            async with asyncio.timeout(config.timeout_s):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        break
                    message = json.loads(line)
                    if message.get("event") == "attack":
                        gc.collect()
                        rss["start"] = rss_bytes()
                        peak = rss["start"]
                        accepted_before = server.stats.accepted
                        watch.counting = True
                        monitor = asyncio.create_task(watch_attack())
                        say("unloaded stream done; attack started")
                    elif message.get("event") == "report":
                        report = message["report"]
                await proc.wait()
        finally:
            if monitor is not None:
                monitor.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0 or report is None:
            tail = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()[-3:] if proc.stderr else []
            raise RelaydiffError(f"the bench clients failed (exit {proc.returncode}): {' | '.join(tail)}")
        watch.counting = False
        rss["peak"] = peak
        t_end = time.monotonic()
        while server.ledger.pending() and time.monotonic() - t_end < 60.0:  # the cancelled work ends at its next step
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        gc.collect()
        rss["after"] = rss_bytes()
        stats = asdict(server.stats)
    accepted = watch.accepted
    doubled = sum(v for k, v in watch.completions.items() if k.endswith("(refused second result)"))
    unanswered = sorted(k for k in accepted if watch.completions[k] < accepted[k])
    answered_once = not unanswered and doubled == 0 and all(watch.completions[k] == accepted[k] for k in accepted)
    honest = report["honest"]
    p = {phase: {"p50_s": _pct(honest[phase], 50), "p95_s": _pct(honest[phase], 95), "requests": len(honest[phase])}
         for phase in ("unloaded", "attack")}
    ratio = {q: _ratio(p["attack"][f"{q}_s"], p["unloaded"][f"{q}_s"]) for q in ("p50", "p95")}
    mib = {k: round(v / MIB, 1) for k, v in rss.items()}
    return {
        "config": spec["config"],
        "honest": {
            "unloaded": p["unloaded"], "attack": p["attack"],
            "p50_ratio": None if ratio["p50"] is None else round(ratio["p50"], 3),
            "p95_ratio": None if ratio["p95"] is None else round(ratio["p95"], 3),
            "modes": honest["modes"], "fell_back_to_device_only": honest["modes"].get("device-only", 0) > 0,
            "fallback_reasons": honest["fallback_reasons"][:5],
        },
        "identity": _identity(config, stats),
        "host_rss_mib": mib,
        "rss_after_minus_start_mib": round((rss["after"] - rss["start"]) / MIB, 1),
        "attack": report["attack"],
        "host_stats": stats,
        "invariants": {
            "accepted_in_attack_phase": sum(accepted.values()),
            "answered_exactly_once_in_ledger": answered_once,
            "unanswered": unanswered[:10], "doubled_results": doubled,
            "wire_answer_violations": report["attack"]["wire_answer_violations"],
            "max_completed_in_ledger": watch.max_completed, "ledger_max_entries": config.ledger_max_entries,
            "max_pending_in_ledger": watch.max_pending, "max_queue": config.max_queue,
            "ledger_within_bound": watch.max_completed <= config.ledger_max_entries and watch.max_pending <= config.max_queue,
        },
        "targets": {
            "p95_within_2x": ratio["p95"] is not None and ratio["p95"] <= 2.0,
            "never_device_only": honest["modes"].get("device-only", 0) == 0,
            "rss_back_within_50mb": rss["after"] - rss["start"] <= 50e6,
        },
    }


def _identity(config: AttackBenchConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """Whether the attackers are a client of their own, and what the host can do about it either way."""
    from relaydiff.host.controller import DEFAULT_CLIENT

    shared = config.attackers_share_token
    attacker = DEFAULT_CLIENT if shared else ATTACKER_CLIENT
    busy, evicted = stats.get("busy_by_client", {}), stats.get("evicted_by_client", {})
    if shared:
        note = ("the attackers hold the honest device's token: to the host they are one client, so quotas and fair share "
                "across clients cannot separate them; the host can still share that client's work per link (the honest "
                "device's link, under its share, evicts queued work of the attacker's fullest link, and host runs go "
                "round-robin over links), but an attacker opening more links than the queue cap holds takes every share; "
                "only a token per device (client_tokens) or revoking the stolen token separates them")
    else:
        note = ("the attackers hold a token of their own (client %r): the per-client quota and fair share bound them "
                "however many links they open, and the honest device's requests evict their queued work" % ATTACKER_CLIENT)
    return {"attackers_share_honest_identity": shared, "honest_client": DEFAULT_CLIENT, "attacker_client": attacker,
            "busy_by_client": busy, "evicted_by_client": evicted, "note": note}


def bench_attack(config: AttackBenchConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the attack bench; returns the JSON-ready report (``ok``: both invariants held)."""
    from relaydiff.core import family

    family_dir = Path(config.family) if config.family is not None else family.default_family_dir()
    report = asyncio.run(_run(config, family_dir, log or (lambda _m: None)))
    inv = report["invariants"]
    report["ok"] = bool(inv["answered_exactly_once_in_ledger"] and inv["wire_answer_violations"] == 0 and inv["ledger_within_bound"])
    report["family"] = str(family_dir)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of :func:`bench_attack`'s report."""
    h, inv, t, a, m = report["honest"], report["invariants"], report["targets"], report["attack"], report["host_rss_mib"]

    def s(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return "\n".join([
        f"attack on a loopback host ({report['family']}):",
        f"  honest device: p50 {s(h['unloaded']['p50_s'])} s -> {s(h['attack']['p50_s'])} s (x{s(h['p50_ratio'])}), "
        f"p95 {s(h['unloaded']['p95_s'])} s -> {s(h['attack']['p95_s'])} s (x{s(h['p95_ratio'])}; target <= 2x: "
        f"{'met' if t['p95_within_2x'] else 'NOT met'}); modes under attack {h['modes']}; device-only fallback: "
        f"{'yes' if h['fell_back_to_device_only'] else 'never'}",
        f"  identity: {'the attackers share the honest device token (one client)' if report['identity']['attackers_share_honest_identity'] else 'the attackers hold a token of their own'}; "
        f"busy by client {report['identity']['busy_by_client']}, evicted by client {report['identity']['evicted_by_client']}",
        f"  host RSS: start {m['start']} MiB, peak {m['peak']} MiB, after {m['after']} MiB "
        f"(after - start {report['rss_after_minus_start_mib']} MiB; target <= 50 MB: {'met' if t['rss_back_within_50mb'] else 'NOT met'})",
        f"  attack: {a['amplification_waves']} amplification waves ({a['amplification_sent']} requests sent), "
        f"{a['oversize_sent']} oversize results, {a['pre_hello_refused']}/{a['pre_hello_sent']} pre-Hello frames refused, "
        f"{a['reused_id_rounds']} reused-id rounds, {a['guesses_refused']}/{a['guesses_sent']} guesses refused "
        f"({a['guesses_locked_out']} locked out)",
        f"  {inv['accepted_in_attack_phase']} requests accepted under attack: exactly one result each: "
        f"{'yes' if inv['answered_exactly_once_in_ledger'] else 'NO'} ({len(inv['unanswered'])} unanswered, "
        f"{inv['doubled_results']} doubled), wire answer violations {inv['wire_answer_violations']}, ledger completed "
        f"<= {inv['max_completed_in_ledger']} (bound {inv['ledger_max_entries']}), pending <= {inv['max_pending_in_ledger']} "
        f"(queue cap {inv['max_queue']}): {'within' if inv['ledger_within_bound'] else 'NOT within'} bound",
    ])


# ----------------------------------------------------------------------------- the clients (child process)


def _clients_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: the honest device's two streams and every attacker; stops the attack on "stop" from stdin."""
    import torch

    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.device import DeviceRuntime

    torch.set_num_threads(1)
    cfg = AttackBenchConfig(**{**spec["config"], "family": None})
    runtime = DeviceRuntime(create_backend("torch", family_dir=spec["family"]))
    return asyncio.run(_clients(cfg, spec["url"], runtime))


async def _clients(cfg: AttackBenchConfig, url: str, runtime: Any) -> dict[str, Any]:
    import io

    from PIL import Image

    from relaydiff.link import LinkConfig
    from relaydiff.link.events import (
        DeviceCapabilities, Error, Feedback, GenerateRequest, Ping, Pong, Progress, RelayHandoff, Result, ResultKind,
    )
    from relaydiff.link.transport import connect
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.settings import GenerationSettings

    link_config = LinkConfig(recv_timeout_s=120.0, send_timeout_s=60.0, open_timeout_s=30.0, handshake_timeout_s=30.0)
    settings = GenerationSettings(steps=cfg.steps)
    caps = DeviceCapabilities(("torch",), "bench-attacker", "ab" * 32, 1.0)
    attacker_token = TOKEN if cfg.attackers_share_token else ATTACKER_TOKEN
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def read_stop() -> None:  # the parent writes "stop" once its host accepted enough requests
        for line in sys.stdin:
            if line.strip() == "stop":
                loop.call_soon_threadsafe(stop.set)
                return

    threading.Thread(target=read_stop, daemon=True).start()
    honest: dict[str, Any] = {"unloaded": [], "attack": [], "modes": Counter(), "fallback_reasons": []}
    counts: Counter[str] = Counter()
    wire: dict[str, list[str]] = {}  # request id on a link that stays open -> what came back for it

    async def honest_one(phase: str, i: int) -> None:
        client = DeviceClient(runtime, url, auth_token=TOKEN, settings=settings, deadline_s=cfg.honest_deadline_s,
                              link_config=link_config)
        t0 = time.perf_counter()
        outcome = await client.generate(f"an honest red circle {i}")
        honest[phase].append(time.perf_counter() - t0)
        if phase == "attack":
            honest["modes"][outcome.mode] += 1
            if outcome.fallback_reason:
                honest["fallback_reasons"].append(outcome.fallback_reason)

    def kind(event: Any) -> str:
        if isinstance(event, Error):
            return event.code
        return {RelayHandoff: "handoff", Result: "result"}.get(type(event), type(event).__name__)

    async def answer_for(link: Any, request_id: str) -> Any:
        while True:
            event = await link.recv()
            if getattr(event, "request_id", None) == request_id and not isinstance(event, Progress):
                return event

    async def amplification() -> None:
        wave = 0
        while not stop.is_set():
            links = [x for x in await asyncio.gather(*(connect(url, auth_token=attacker_token, capabilities=caps, config=link_config)
                                                        for _ in range(cfg.links)), return_exceptions=True)
                     if not isinstance(x, BaseException)]
            for i, link in enumerate(links):
                for j in range(cfg.requests_per_link):
                    await link.send(GenerateRequest(f"a{j}", f"attack {wave} {i} {j}", 1.0, 3600.0))
                    counts["amplification_sent"] += 1
            await asyncio.sleep(0.2)  # the host admits or refuses them
            for link in links:
                link.websocket.transport.abort()  # gone at once, without a Close
            wave += 1
            counts["amplification_waves"] += 1

    async def oversize() -> None:
        blob = b"\x89PNG\r\n\x1a\n" + os.urandom(cfg.oversize_bytes - 8)
        link = await connect(url, auth_token=attacker_token, capabilities=caps, config=link_config)
        try:
            i = 0
            while not stop.is_set() and counts["oversize_sent"] < cfg.oversize_results:
                rid = f"o{i}"
                i += 1
                await link.send(GenerateRequest(rid, "an oversize result", 0.5, 120.0))
                event = await answer_for(link, rid)
                wire[f"oversize/{rid}"] = [kind(event)]
                if isinstance(event, RelayHandoff):
                    await link.send(Result(rid, ResultKind.PNG, blob))
                    counts["oversize_sent"] += 1
                    wire[f"oversize/{rid}"].append(kind(await answer_for(link, rid)))
                elif isinstance(event, Error) and event.code == "busy":
                    await asyncio.sleep(0.2)
        finally:
            await link.close()

    async def pre_hello() -> None:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import ConnectionClosed

        for _ in range(cfg.pre_hello_frames):
            if stop.is_set():
                break
            counts["pre_hello_sent"] += 1
            try:
                async with ws_connect(url, max_size=None, proxy=None, open_timeout=30.0) as ws:
                    try:
                        await ws.send(b"\0" * cfg.pre_hello_bytes)
                        await asyncio.wait_for(ws.recv(), 30.0)
                    except ConnectionClosed:
                        counts["pre_hello_refused"] += 1
            except (OSError, TimeoutError, ConnectionClosed):
                counts["pre_hello_refused"] += 1

    def tiny_png() -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="PNG")
        return buf.getvalue()

    async def reused_ids() -> None:
        link = await connect(url, auth_token=attacker_token, capabilities=caps, config=link_config)
        png = tiny_png()
        try:
            n = 0
            while not stop.is_set():
                n += 1
                key = f"reused/r#{n}"
                await link.send(GenerateRequest("r", "a reused id", 0.5, 120.0))
                event = await answer_for(link, "r")
                wire[key] = [kind(event)]
                if isinstance(event, RelayHandoff):
                    await link.send(Result("r", ResultKind.PNG, png))
                    await link.send(Feedback("r", 1.0, 0.5))
                await link.send(Ping(n, 0.0))  # a barrier: anything else about "r" arrives before its Pong
                while True:
                    event = await link.recv()
                    if isinstance(event, Pong) and event.nonce == n:
                        break
                    if getattr(event, "request_id", None) == "r" and not isinstance(event, Progress):
                        wire[key].append(kind(event))
                counts["reused_id_rounds"] += 1
                if wire[key] == ["busy"]:
                    await asyncio.sleep(0.2)
        finally:
            await link.close()

    async def guessing() -> None:
        from websockets.asyncio.client import connect as ws_connect

        from relaydiff.link.connection import Connection
        from relaydiff.link.transport import Link

        for i in range(cfg.guesses):
            if stop.is_set():
                break
            counts["guesses_sent"] += 1
            try:
                async with ws_connect(url, proxy=None, local_addr=("127.0.0.2", 0), open_timeout=30.0) as ws:
                    connection = Connection("device", auth_token=f"wrong-guess-{i:012d}", config=link_config)
                    link = Link(ws, connection)
                    await link.send(connection.hello(caps))
                    answer = await link.recv(timeout=30.0)
                    if isinstance(answer, Error):
                        counts["guesses_refused"] += 1
                        counts["guesses_locked_out"] += "too many failed logins" in answer.message
            except Exception as exc:  # a refused guess may also end as a closed socket
                counts["guesses_refused"] += 1
                counts["guess_errors_" + type(exc).__name__] += 1

    async def guarded(name: str, coro: Any) -> None:
        try:
            await coro
        except Exception as exc:  # an attacker's own failure is reported, not fatal to the run
            counts[f"attacker_failed_{name}"] += 1
            print(f"attacker {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    for i in range(cfg.honest_requests):
        await honest_one("unloaded", i)
    print(json.dumps({"event": "attack"}), flush=True)
    attackers = [asyncio.create_task(guarded(n, c)) for n, c in (
        ("amplification", amplification()), ("oversize", oversize()), ("pre_hello", pre_hello()),
        ("reused_ids", reused_ids()), ("guessing", guessing()))]
    i = 0
    while not stop.is_set() or i < cfg.honest_requests:
        await honest_one("attack", i)
        i += 1
    stop.set()
    await asyncio.gather(*attackers)
    allowed = {("handoff",), ("handoff", "request_failed"), ("busy",), ("deadline_exceeded",)}
    violations = {k: v for k, v in wire.items() if tuple(v) not in allowed}
    attack: dict[str, Any] = {name: counts[name] for name in ("amplification_waves", "amplification_sent", "oversize_sent", "pre_hello_sent",
                                              "pre_hello_refused", "reused_id_rounds", "guesses_sent", "guesses_refused",
                                              "guesses_locked_out")}
    attack.update({k: v for k, v in counts.items() if k.startswith(("attacker_failed_", "guess_errors_"))})
    attack["wire_requests_checked"] = len(wire)
    attack["wire_answer_violations"] = len(violations)
    attack["wire_violation_examples"] = dict(list(violations.items())[:5])
    honest["modes"] = dict(honest["modes"])
    return {"honest": honest, "attack": attack}


if __name__ == "__main__":  # the clients' child process of `relaydiff bench attack`
    if len(sys.argv) == 3 and sys.argv[1] == "--clients-worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps({"event": "report", "report": _clients_worker(json.loads(sys.argv[2]))}), flush=True)
    else:
        raise SystemExit("usage: relaydiff bench attack (this module's entry point is the bench's client process)")
