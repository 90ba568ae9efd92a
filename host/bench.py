"""``relaydiff bench link``: what the link costs, and what the relay buys the host.

Two measurements, each side by side with its baseline in the same run (these machines are noisy):

1. **Hand-off overhead** on a loopback WebSocket link. The payload is a Stable-Diffusion-size relay
   state: a 1x4x64x64 float32 latent plus the conditional and unconditional CLIP-L embeddings
   (2 x 1x77x768 float32), about 540 kB. Per round, the device sends a ``GenerateRequest``; the host
   serialises the state, sends the ``RelayHandoff``; the device decodes and validates it (safetensors
   parse, dtype/shape/NaN checks) and answers with a one-value ``Result``. The host times from
   serialisation to the Result. The baseline is a bare ``Ping``/``Pong`` round trip on the same link,
   interleaved with the hand-offs. Overhead = median(hand-off round trip) - median(ping RTT).
2. **Host throughput** with ``devices`` concurrent devices on a family (the embedded one by default):
   host-only (k = N) against relay at k = ``fraction`` x N, with and without host-step batching,
   one after the other in one run. The host runs in this process pinned to CPU 0; the devices run in one
   child process pinned to the other CPUs (standing in for phones, which bring their own compute), started
   once for the four runs and warmed up (one untimed generation) before the first, so every run meets a warm device;
   on a 1-CPU machine both share it and the report says so. Throughput = requests / wall seconds from
   the first request sent to the last result, as seen by the devices; every request is checked to be
   answered exactly once in the host's ledger. The host's capacity (requests per second of host-busy
   time, the seconds its worker spent in host runs) is reported beside it: with the devices on one shared
   CPU, the end-to-end rate of the relay runs can be bounded by the devices rather than the host.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from relaydiff.core.errors import RelaydiffError

TOKEN = "bench-link-token"


@dataclass(frozen=True)
class LinkBenchConfig:
    """What ``relaydiff bench link`` measures."""

    rounds: int = 200  # hand-offs (and as many pings) for the overhead figure
    latent_shape: tuple[int, int, int, int] = (1, 4, 64, 64)  # SD 1.5 at 512x512
    embed_shape: tuple[int, int, int] = (1, 77, 768)  # CLIP-L, conditional and unconditional
    family: Path | None = None  # family for the throughput part; None: the embedded default
    devices: int = 32  # concurrent device links
    requests_per_device: int = 2  # requests each device sends, one after the other
    steps: int = 25  # N
    fraction: float = 0.3  # relay at k = round(fraction * N)
    max_batch: int = 8  # host-step batching for the batched runs
    throughput: bool = True  # False: hand-off overhead only

    def __post_init__(self) -> None:
        for name in ("rounds", "devices", "requests_per_device", "steps", "max_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RelaydiffError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < self.fraction < 1.0:
            raise RelaydiffError(f"fraction must be in (0, 1), got {self.fraction!r}")
        if self.family is not None and not Path(self.family).is_dir():
            raise RelaydiffError(f"family folder {str(self.family)!r} does not exist")


# ----------------------------------------------------------------------------- 1. hand-off overhead


def _sd_state(config: LinkBenchConfig) -> Any:
    import torch

    from relaydiff.core.state import RelayState

    g = torch.Generator().manual_seed(0)
    return RelayState(
        latents=torch.randn(config.latent_shape, generator=g),
        step_index=8,
        timesteps=torch.arange(961, 0, -40),
        sampler="ddim",
        scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"},
        guidance_scale=7.5,
        prompt_embeds=torch.randn(config.embed_shape, generator=g),
        negative_prompt_embeds=torch.randn(config.embed_shape, generator=g),
        prompt="a large red circle left of a small blue square",
        seed=0,
    )


async def _handoff_overhead(config: LinkBenchConfig) -> dict[str, Any]:
    import torch

    from relaydiff.core.state import RelayState, latents_to_bytes
    from relaydiff.link import DeviceCapabilities, GenerateRequest, LinkConfig, Ping, Pong, RelayHandoff, Result, ResultKind
    from relaydiff.link.transport import Link, connect, serve

    state = _sd_state(config)
    state_bytes = len(state.to_bytes())
    link_config = LinkConfig()
    ping_s: list[float] = []
    handoff_s: list[float] = []
    done = asyncio.Event()

    async def host(link: Link) -> None:  # times everything from its side of the link
        for i in range(config.rounds):
            t0 = time.perf_counter()
            await link.send(Ping(i, 0.0))
            pong = await link.recv()
            ping_s.append(time.perf_counter() - t0)
            assert isinstance(pong, Pong) and pong.nonce == i
            request = await link.recv()
            assert isinstance(request, GenerateRequest)
            t0 = time.perf_counter()
            await link.send(RelayHandoff(request.request_id, state.to_bytes()))  # serialise + send
            result = await link.recv()  # the device parsed and validated it, then answered
            handoff_s.append(time.perf_counter() - t0)
            assert isinstance(result, Result) and result.request_id == request.request_id
        done.set()

    async def device(url: str) -> None:
        caps = DeviceCapabilities(("torch",), "bench-device", "00" * 32, 1.0)
        link = await connect(url, auth_token=TOKEN, capabilities=caps, config=link_config)
        tiny = latents_to_bytes(torch.zeros(1, 1, 1, 1))
        for i in range(config.rounds):
            ping = await link.recv()
            if not isinstance(ping, Ping):
                raise RuntimeError(f"bench device: expected a Ping, got {ping!r}")
            await link.send(ping.pong())
            await link.send(GenerateRequest(f"r{i}", "bench", 0.5, 60.0))
            handoff = await link.recv()
            if not isinstance(handoff, RelayHandoff):
                raise RelaydiffError(f"bench device expected a RelayHandoff, got {type(handoff).__name__}")
            got = RelayState.from_bytes(handoff.relay_state)  # parse + validate, as the device runtime does
            if got.latents.shape != state.latents.shape:
                raise RelaydiffError(f"bench device got a latent of shape {tuple(got.latents.shape)}")
            await link.send(Result(f"r{i}", ResultKind.LATENT, tiny, {"device_s": 0.0}))
        await done.wait()
        await link.close("bench done")

    async with await serve(host, auth_token=TOKEN, config=link_config) as server:
        await asyncio.wait_for(device(server.url), timeout=60.0 + config.rounds * 1.0)
    skip = min(5, config.rounds // 10)  # the first rounds warm up buffers and the allocator
    ping_ms = 1e3 * statistics.median(ping_s[skip:])
    handoff_ms = 1e3 * statistics.median(handoff_s[skip:])
    return {
        "state_bytes": state_bytes,
        "latent_shape": list(config.latent_shape),
        "embed_shape": list(config.embed_shape),
        "rounds": config.rounds,
        "ping_rtt_ms_median": round(ping_ms, 3),
        "handoff_round_trip_ms_median": round(handoff_ms, 3),
        "handoff_round_trip_ms_p90": round(1e3 * sorted(handoff_s[skip:])[int(0.9 * (len(handoff_s) - skip))], 3),
        "overhead_ms": round(handoff_ms - ping_ms, 3),
        "target_overhead_ms": 2.0,
        "meets_target": handoff_ms - ping_ms <= 2.0,
    }


# ----------------------------------------------------------------------------- 2. host throughput


def _pin(cpus: set[int]) -> bool:
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        return False
    return True


async def _serve_runs(config: LinkBenchConfig, family_dir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch

    from relaydiff.core import family
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.policy import FixedPolicy
    from relaydiff.link import LinkConfig
    from relaydiff.runtime.settings import GenerationSettings

    torch.set_num_threads(1)
    host_ref, device_ref = family.resolve(family_dir, None, role="host"), family.resolve(family_dir, None, role="device")
    host_model = family.load(host_ref)
    device_model = family.load(device_ref, share_with=host_model)
    settings = GenerationSettings(steps=config.steps)
    runs = [("host-only", 1.0, 1), ("relay", config.fraction, 1), ("host-only", 1.0, config.max_batch),
            ("relay", config.fraction, config.max_batch)]
    link_config = LinkConfig(recv_timeout_s=600.0, send_timeout_s=60.0)
    out = []
    # one devices process for all the runs (it imports torch and loads the family once, then warms its runtime up, so
    # every run meets a warm device); each run sends it the host's URL on stdin and reads its result line back
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaydiff.host.bench", "--devices-worker", json.dumps({
            "family": str(family_dir), "devices": config.devices, "requests": config.requests_per_device, "steps": config.steps,
        }),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    err_tail: collections.deque[str] = collections.deque(maxlen=3)
    drain = asyncio.create_task(_drain(worker.stderr, err_tail))  # read as it comes: a full stderr pipe would block the worker
    try:
        for mode, fraction, max_batch in runs:
            host_config = HostConfig(settings=settings, link=link_config, max_batch=max_batch, result_timeout_s=600.0)
            server = HostServer(host_model, device_model, auth_token=TOKEN, policy=FixedPolicy(fraction), config=host_config)
            async with server:
                log(f"{mode} (max_batch {max_batch}): {config.devices} devices x {config.requests_per_device} requests")
                devices = await _worker_run(worker, server.url, err_tail, drain)
            out.append(_run_row(server, devices, config, mode, fraction, max_batch))
    finally:
        if worker.returncode is None:
            assert worker.stdin is not None
            worker.stdin.close()  # end of the runs: the worker exits on EOF
            try:
                await asyncio.wait_for(worker.wait(), timeout=60.0)
            except asyncio.TimeoutError:
                worker.kill()
                await worker.wait()
        await drain
    return out


async def _drain(stream: Any, tail: collections.deque[str]) -> None:
    while line := await stream.readline():
        tail.append(line.decode(errors="replace").rstrip())


RESULT = "relaydiff-bench-devices "  # the prefix of the worker's result lines (library output may share its stdout)


async def _worker_run(worker: Any, url: str, err_tail: collections.deque[str], drain: asyncio.Task[None]) -> dict[str, Any]:
    """One run of the devices worker against the host at ``url``: its result (wall seconds, mean latency, modes seen)."""
    assert worker.stdin is not None and worker.stdout is not None
    try:
        worker.stdin.write((json.dumps({"url": url}) + "\n").encode())
        await worker.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # it has exited: read why below
    while True:
        line = (await worker.stdout.readline()).decode()
        if not line:
            code = await worker.wait()
            await drain
            raise RelaydiffError(f"the bench devices failed (exit {code}): {' | '.join(line for line in err_tail if line)}")
        if line.startswith(RESULT):
            result: dict[str, Any] = json.loads(line[len(RESULT):])
            return result


def _run_row(server: Any, devices: dict[str, Any], config: LinkBenchConfig, mode: str, fraction: float, max_batch: int) -> dict[str, Any]:
    from relaydiff.host.ledger import Source

    entries = server.ledger.entries()
    n = config.devices * config.requests_per_device
    sources: dict[str, int] = {}
    for e in entries:
        sources[e.source.value if e.source is not None else "none"] = sources.get(
            e.source.value if e.source is not None else "none", 0) + 1
    answered_once = len(entries) == n == len({e.key for e in entries}) and not server.ledger.pending()
    host_s = [e.timings.get("host_s", 0.0) for e in entries]
    return {
        "mode": mode,
        "relay_step": round(fraction * config.steps),
        "max_batch": max_batch,
        "requests": n,
        "wall_s": round(devices["wall_s"], 3),
        "requests_per_s": round(n / devices["wall_s"], 3),
        "mean_latency_s": round(devices["mean_latency_s"], 3),
        "mean_batch": round(sum(server.batch_sizes) / max(1, len(server.batch_sizes)), 2),
        "mean_host_run_s": round(sum(host_s) / max(1, len(host_s)), 4),
        "host_busy_s": round(server.host_busy_s, 3),
        "host_capacity_requests_per_s": round(n / server.host_busy_s, 3) if server.host_busy_s > 0 else None,
        "sources": sources,
        "modes_seen_by_devices": devices["modes"],
        "answered_exactly_once": answered_once and all(e.source not in (Source.FAILED,) for e in entries),
    }


def _devices_worker(spec: dict[str, Any], urls: Any, emit: Callable[[dict[str, Any]], None]) -> None:
    """Child process: ``devices`` DeviceClients on one torch device runtime, each sending ``requests`` requests, once per
    host URL read from ``urls`` (one JSON line ``{"url": ...}`` per run, until EOF); ``emit`` gets each run's result.

    The runtime is loaded once and warmed up (one untimed device-only generation) before the first run, so every run,
    the first one too, meets a warm device.
    """
    import torch

    from relaydiff.link import LinkConfig
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime
    from relaydiff.runtime.settings import GenerationSettings
    from relaydiff.world import sample_prompts

    torch.set_num_threads(1)
    runtime = DeviceRuntime(create_backend("torch", family_dir=spec["family"]))
    settings = GenerationSettings(steps=spec["steps"])
    link_config = LinkConfig(recv_timeout_s=600.0, send_timeout_s=60.0, open_timeout_s=30.0)
    prompts = sample_prompts(7, spec["devices"] * spec["requests"])
    runtime.generate(settings.request(prompts[0], 0))  # warm-up, untimed (first-call allocations)

    def one_run(url: str) -> dict[str, Any]:
        async def one_device(i: int) -> list[Any]:
            client = DeviceClient(runtime, url, auth_token=TOKEN, settings=settings, deadline_s=600.0,
                                  link_config=link_config)
            return [await client.generate(prompts[i * spec["requests"] + j]) for j in range(spec["requests"])]

        async def main() -> list[Any]:
            return await asyncio.gather(*(one_device(i) for i in range(spec["devices"])))

        t0 = time.perf_counter()
        outcomes = [o for per in asyncio.run(main()) for o in per]
        wall = time.perf_counter() - t0
        modes: dict[str, int] = {}
        for o in outcomes:
            modes[o.mode] = modes.get(o.mode, 0) + 1
        return {"wall_s": wall, "mean_latency_s": sum(o.latency_s for o in outcomes) / len(outcomes), "modes": modes}

    for line in urls:
        if line.strip():
            emit(one_run(str(json.loads(line)["url"])))


# ----------------------------------------------------------------------------- the command


def bench_link(config: LinkBenchConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run both measurements; returns the JSON-ready report."""
    from relaydiff.core import family

    say = log or (lambda _m: None)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}}
    say(f"hand-off overhead: {config.rounds} rounds")
    report["handoff"] = asyncio.run(_handoff_overhead(config))
    if not config.throughput:
        return report
    family_dir = Path(config.family) if config.family is not None else family.default_family_dir()
    pinned = len(cpus) >= 2 and _pin({cpus[0]})
    placement = (f"host pinned to CPU {cpus[0]}, devices to CPUs {cpus[1:]}" if pinned
                 else "host and devices share every CPU (fewer than 2 available)")
    try:
        if pinned:  # the child inherits the mask at exec; give it the other CPUs
            os.environ["RELAYDIFF_BENCH_DEVICE_CPUS"] = ",".join(str(c) for c in cpus[1:])
        runs = asyncio.run(_serve_runs(config, family_dir, say))
    finally:
        os.environ.pop("RELAYDIFF_BENCH_DEVICE_CPUS", None)
        if pinned:
            _pin(set(cpus))
    by = {(r["mode"], r["max_batch"]): r for r in runs}
    ratio_unbatched = by[("relay", 1)]["requests_per_s"] / by[("host-only", 1)]["requests_per_s"]
    ratio_batched = by[("relay", config.max_batch)]["requests_per_s"] / by[("host-only", 1)]["requests_per_s"]
    cap = {key: r["host_capacity_requests_per_s"] for key, r in by.items()}
    report["throughput"] = {
        "family": str(family_dir),
        "placement": placement,
        "runs": runs,
        "relay_over_host_only": round(ratio_unbatched, 3),
        "relay_batched_over_host_only": round(ratio_batched, 3),
        "host_capacity_relay_over_host_only": round(cap[("relay", 1)] / cap[("host-only", 1)], 3),
        "host_capacity_relay_batched_over_host_only": round(cap[("relay", config.max_batch)] / cap[("host-only", 1)], 3),
        "target_ratio": 2.5,
        "meets_target": max(ratio_unbatched, ratio_batched) >= 2.5,
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of :func:`bench_link`'s report."""
    h = report["handoff"]
    lines = [
        f"hand-off of a {h['state_bytes']:,}-byte relay state (latent {h['latent_shape']}, embeddings 2x{h['embed_shape']}), "
        f"{h['rounds']} rounds on loopback:",
        f"  ping RTT {h['ping_rtt_ms_median']:.3f} ms | hand-off round trip {h['handoff_round_trip_ms_median']:.3f} ms "
        f"(p90 {h['handoff_round_trip_ms_p90']:.3f}) | overhead {h['overhead_ms']:.3f} ms "
        f"(target <= 2 ms: {'met' if h['meets_target'] else 'NOT met'})",
    ]
    t = report.get("throughput")
    if t:
        lines += [f"host throughput on {t['family']} ({t['placement']}):",
                  f"  {'mode':<10} {'k':>3} {'batch':>5} {'req':>4} {'wall s':>8} {'req/s':>7} {'latency s':>9} {'mean batch':>10} "
                  f"{'host busy s':>11} {'host req/s':>10}  once"]
        for r in t["runs"]:
            lines.append(f"  {r['mode']:<10} {r['relay_step']:>3} {r['max_batch']:>5} {r['requests']:>4} {r['wall_s']:>8.2f} "
                         f"{r['requests_per_s']:>7.2f} {r['mean_latency_s']:>9.2f} {r['mean_batch']:>10.2f} "
                         f"{r['host_busy_s']:>11.2f} {r['host_capacity_requests_per_s']:>10.2f}  "
                         f"{'yes' if r['answered_exactly_once'] else 'NO'}")
        lines.append(f"  end-to-end requests/s, relay / host-only: {t['relay_over_host_only']:.2f}x unbatched, "
                     f"{t['relay_batched_over_host_only']:.2f}x with batching (target >= 2.5x: "
                     f"{'met' if t['meets_target'] else 'NOT met'})")
        lines.append(f"  host capacity (requests per host-busy second), relay / host-only: "
                     f"{t['host_capacity_relay_over_host_only']:.2f}x unbatched, "
                     f"{t['host_capacity_relay_batched_over_host_only']:.2f}x with batching")
    return "\n".join(lines)


if __name__ == "__main__":  # the devices' child process of the throughput runs
    if len(sys.argv) == 3 and sys.argv[1] == "--devices-worker":
        cpus = os.environ.get("RELAYDIFF_BENCH_DEVICE_CPUS")
        if cpus:
            _pin({int(c) for c in cpus.split(",")})
        _devices_worker(json.loads(sys.argv[2]), sys.stdin, lambda r: print(RESULT + json.dumps(r), flush=True))
    else:
        raise SystemExit("usage: relaydiff bench link (this module's entry point is the bench's device process)")
