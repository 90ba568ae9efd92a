"""``relaydiff bench device``: size, load time and per-call latency of a bundle's artifacts, torch fp32 beside them.

For every artifact of a bundle's manifest whose runtime exists on this machine (onnxruntime for
``.onnx`` and its ``.ort`` sibling, ExecuTorch's Python runtime for ``.pte``; CoreML only on macOS) it
measures the size on disk, the time to load the file into its runtime and the median latency of one
call (one denoiser step for ``unet_step``) after warm-up, on the bundle's own parity fixture (inputs
drawn from a held-out relay). The torch fp32 reference (the family's device model) is measured in the
same run on the same inputs, with the same number of intra-op threads, and each row gets its ratio
to torch. Per (target, precision) holding both ``unet_step`` and ``vae_decoder`` it also times the
device side of a relay: steps [k, N) through ``relay.resume`` with the artifact as the UNet, then the
artifact decoder, against the same with torch.

The artifacts run in :class:`relaydiff.runtime.sessions.ArtifactSession`, as on the device and in ``device_tests/``.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.bundle import ArtifactEntry, BundleError, Manifest, find_family, load_fixture, open_session, runnable_files
from relaydiff.runtime.sessions import ArtifactSession, runtime_unavailable

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`bench_device` measures."""

    bundle: Path  # bundle folder written by `relaydiff bundle build`
    repeats: int = 20  # timed calls per artifact; the median is reported
    warmup: int = 2  # untimed calls before timing (first-call allocations, XNNPACK packing)
    threads: int = 1  # intra-op threads for onnxruntime and torch alike, so that the ratio compares like with like
    family: Path | None = None  # family folder of the torch reference; default: the one recorded in the artifacts' metadata
    relay: bool = True  # also time the device half of a relay (steps [k, N) + decode) per target and precision
    memory: bool = True  # peak RSS of each runtime loading and calling one artifact, in a fresh process per file
    components: tuple[str, ...] | None = None  # only these components' artifacts (and torch references); None: all of them

    def __post_init__(self) -> None:
        for name, low in (("repeats", 1), ("warmup", 0), ("threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RelaydiffError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.components is not None and not self.components:
            raise RelaydiffError("components must name at least one component, got none")


# ------------------------------------------------------------------------------------------------ inputs


def load_pair(folder: Path, manifest: Manifest) -> tuple[Any, Any]:
    """(host, device) of the bundle's family, with the variants the manifest names."""
    from relaydiff.core import family

    host_ref = family.resolve(folder, manifest.family.host_variant, role="host")
    dev_ref = family.resolve(folder, manifest.family.device_variant, role="device")
    host = family.load(host_ref)
    return host, family.load(dev_ref, share_with=host)


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (.mlpackage)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- timing


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_reference(device: Any, component: str, inputs: Arrays, config: BenchConfig) -> dict[str, Any]:
    import torch

    from relaydiff.export.components import component_for

    comp = component_for(component, device)
    t0 = time.perf_counter()
    module = comp.module(device)
    build_s = time.perf_counter() - t0
    args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in comp.signature(device).inputs]

    def call() -> Any:
        with torch.inference_mode():
            return module(*args)

    return {"build_seconds": build_s, "call_seconds": median_seconds(call, config.repeats, config.warmup)}


def _relay_device_half(host: Any, device: Any, manifest: Manifest, unet: Callable[[Arrays], dict[str, np.ndarray]] | None,
                       decoder: Callable[[Arrays], dict[str, np.ndarray]] | None, repeats: int) -> float:
    """Median seconds of the device half of one held-out relay: resume [k, N) then decode (torch where a runner is None)."""
    import torch

    from relaydiff.core.relay import decode, resume
    from relaydiff.quantize.calibration import hand_offs
    from relaydiff.quantize.parity import artifact_side, eval_config  # the device side parity.relay_parity runs the relay with

    relay = manifest.relay
    _prompt, state = next(hand_offs(host, device, eval_config(relay.relay_step, relay.steps, prompts=1)))
    model = device if unet is None else artifact_side(device, unet)

    def run() -> Any:
        with torch.inference_mode():
            latents = resume(model, state).latents
        if decoder is None:
            return decode(device, latents)
        return decoder({"latent": latents.float().numpy()})

    return median_seconds(run, repeats, 1)


def bench_device(config: BenchConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every artifact of a bundle beside the torch fp32 reference; return the report (JSON-able).

    Raises:
        BundleError: the folder does not exist or is not a bundle; ``config.family`` is not the bundle's family.
    """
    import torch

    say = log or (lambda _m: None)
    root = config.bundle
    if not root.is_dir():
        raise BundleError(f"bundle folder '{root}' does not exist")
    manifest = Manifest.read(root)
    if config.components is not None:
        have = sorted({a.component for a in manifest.artifacts})
        missing = [c for c in config.components if c not in have]
        if missing:
            raise BundleError(f"the bundle has no {missing[0]!r} artifact; it has: {', '.join(have)}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _bench(root, manifest, config, say)
    finally:
        torch.set_num_threads(threads_before)


def _bench(root: Path, manifest: Manifest, config: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    from relaydiff.core import family as family_mod

    notes: list[str] = []
    folder = find_family(root, manifest, config.family)
    host = device = None
    torch_load_s = None
    if folder is None:
        notes.append("no torch reference: the family folder recorded in the bundle is gone or differs; pass --family")
    else:
        import diffusers  # noqa: F401  (imported before the clock starts: the load time is the model's, not the libraries')
        import transformers  # noqa: F401

        t0 = time.perf_counter()
        device = family_mod.load(family_mod.resolve(folder, manifest.family.device_variant, role="device"))
        torch_load_s = time.perf_counter() - t0  # what a torch device would pay: UNet, VAE, text encoder from disk
        if config.relay:
            host = family_mod.load(family_mod.resolve(folder, manifest.family.host_variant, role="host"))

    fixtures: dict[str, dict[str, np.ndarray]] = {}
    torch_rows: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    rss_jobs: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (row, child spec): measured after all the timing
    sessions: dict[tuple[str, str, str], ArtifactSession] = {}
    for art in manifest.artifacts:
        comp = art.component
        if config.components is not None and comp not in config.components:
            continue
        if comp not in fixtures:
            fixtures[comp] = load_fixture(root, manifest, comp)[0]
        if device is not None and comp not in torch_rows:
            say(f"torch fp32 {comp}")
            ref = _torch_reference(device, comp, fixtures[comp], config)
            torch_rows[comp] = {"component": comp, "load_seconds": round(torch_load_s + ref["build_seconds"], 6),
                                "call_seconds": round(ref["call_seconds"], 6)}
            if config.memory and folder is not None:
                rss_jobs.append((torch_rows[comp], {"mode": "torch", "bundle": str(root), "family": str(folder), "component": comp,
                                                    "threads": config.threads}))
        reason = runtime_unavailable(art.target)
        for file in runnable_files(art):
            row: dict[str, Any] = {"target": art.target, "precision": art.precision, "component": comp, "file": file,
                                   "size": disk_size(root / file), "status": reason or "ok"}
            rows.append(row)
            if reason is not None:
                continue
            say(f"{file}")
            session = open_session(root, art, file, threads=config.threads, allow_failed=True)
            inputs = fixtures[comp]
            call_s = median_seconds(functools.partial(session, inputs), config.repeats, config.warmup)
            row.update({"load_seconds": round(session.load_seconds, 6), "call_seconds": round(call_s, 6)})
            row.update(_delegation(root, art))
            if config.memory:
                rss_jobs.append((row, {"mode": "artifact", "bundle": str(root), "artifact": art.file, "file": file,
                                       "threads": config.threads}))
            if comp in torch_rows:
                row["torch_call_seconds"] = torch_rows[comp]["call_seconds"]
                row["ratio_vs_torch"] = round(call_s / max(torch_rows[comp]["call_seconds"], 1e-12), 4)
            if file == art.file:
                sessions[(art.target, art.precision, comp)] = session

    relay_rows: list[dict[str, Any]] = []
    if config.relay and host is not None and device is not None:
        relay = manifest.relay
        reps = max(1, min(3, config.repeats))
        say("relay device half: torch fp32")
        torch_s = _relay_device_half(host, device, manifest, None, None, reps)
        relay_rows.append({"target": "torch", "precision": "fp32", "device_steps": list(relay.device_steps), "seconds": round(torch_s, 6),
                           "ratio_vs_torch": 1.0})
        for target, precision in sorted({(t, p) for t, p, _c in sessions}):
            unet, dec = sessions.get((target, precision, "unet_step")), sessions.get((target, precision, "vae_decoder"))
            if unet is None or dec is None:
                continue
            say(f"relay device half: {target} {precision}")
            s = _relay_device_half(host, device, manifest, unet, dec, reps)
            relay_rows.append({"target": target, "precision": precision, "device_steps": list(relay.device_steps), "seconds": round(s, 6),
                               "ratio_vs_torch": round(s / max(torch_s, 1e-12), 4)})
    elif config.relay:
        notes.append("no relay timing: it needs the family (host half and torch reference)")
    if rss_jobs:
        # the fresh processes run after every timed call (none of them competes with a timing), a few at a time:
        # each one's peak RSS is its own, whatever runs beside it
        say(f"peak RSS: {len(rss_jobs)} fresh processes")
        _measure_all_rss(rss_jobs)
    _int8_vs_fp32(rows)
    if config.memory:
        notes.append("peak RSS: the rise of a fresh process's peak resident memory while it loads the file and runs 3 calls, "
                     "over its peak after importing the runtime (what the model costs; the Python interpreter is not counted)")
    if any(r["target"] == "executorch" and r["status"] == "ok" for r in rows):
        notes.append("executorch: the Python runtime runs XNNPACK on its own thread pool; --threads does not reach it")
    return {
        "bundle": str(root), "family": str(folder) if folder else None, "family_id": manifest.family.id,
        "threads": config.threads, "repeats": config.repeats, "warmup": config.warmup,
        "components": list(config.components) if config.components is not None else None,
        "artifacts": rows, "torch": list(torch_rows.values()), "relay": relay_rows, "notes": notes,
    }


def _delegation(root: Path, art: ArtifactEntry) -> dict[str, Any]:
    """ExecuTorch: how many XNNPACK delegate calls the program makes and how many ops run outside them (from the build)."""
    if art.target != "executorch":
        return {}
    meta = art.metadata_file()
    if meta is None or not (root / meta).is_file() or (root / meta).stat().st_size > 1 << 20:
        return {}
    data = json.loads((root / meta).read_text()).get("metadata", {})
    outside = data.get("ops_outside_delegates")
    return {"delegate_calls": data.get("delegate_calls"),
            "ops_outside_delegates": sum(int(o["count"]) for o in outside) if isinstance(outside, list) else None}


def _int8_vs_fp32(rows: list[dict[str, Any]]) -> None:
    """Give each INT8 row its fp32 sibling's ratios (same target, component and file kind): size and latency."""
    def kind(r: Mapping[str, Any]) -> str:
        return "ort" if r["file"].endswith(".ort") else "main"

    fp32 = {(r["target"], r["component"], kind(r)): r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        ref = fp32.get((r["target"], r["component"], kind(r)))
        if r["precision"] != "int8" or ref is None:
            continue
        r["fp32_size_over_int8"] = round(ref["size"] / max(r["size"], 1), 3)
        if "call_seconds" in r and "call_seconds" in ref:
            r["call_vs_fp32"] = round(r["call_seconds"] / max(ref["call_seconds"], 1e-12), 4)


def _measure_all_rss(jobs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Run :func:`measure_rss` for every (row, spec) and update each row with its result, up to one process per CPU
    (at most 4) at a time."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(4, cpus, len(jobs)))) as pool:
        results = list(pool.map(lambda job: measure_rss(job[1]), jobs))
    for (row, _spec), got in zip(jobs, results, strict=True):
        row.update(got)


def measure_rss(spec: Mapping[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
    """Peak RSS of loading and calling one artifact (or the torch reference) in a fresh Python process.

    Returns ``{"peak_rss_bytes", "rss_rise_bytes", "rss_rise_over_size"}`` or ``{"rss_error": why}``.
    """
    import subprocess

    cmd = [sys.executable, "-m", "relaydiff.export.bench", "--rss-child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"rss_error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"rss_error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def _status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` memory line (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_baseline() -> int:
    """Reset the peak-RSS watermark where the OS allows (Linux clear_refs 5) and return the RSS to measure from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so import-time peaks do not hide the model's
        now = _status_bytes("VmRSS")
        if now is not None:
            return now
    except OSError:
        pass
    return _peak_rss_bytes()  # elsewhere: the peak so far (a rise can then be under-counted)


def _peak_rss_bytes() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def _rss_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """In a fresh process: import the runtime, note the peak RSS, load the file, call it 3 times, note the peak again."""
    root = Path(spec["bundle"])
    manifest = Manifest.read(root)
    if spec["mode"] == "artifact":
        entry = next(a for a in manifest.artifacts if a.file == spec["artifact"])
        inputs = load_fixture(root, manifest, entry.component)[0]
        target = "onnx" if spec["file"].endswith(".ort") else entry.target
        import importlib

        importlib.import_module({"onnx": "onnxruntime", "executorch": "executorch.runtime", "coreml": "coremltools"}[target])
        if target == "executorch":
            import torch  # noqa: F401  (the runtime's outputs are torch tensors: import before the baseline)
        size = disk_size(root / spec["file"])
        before = _rss_baseline()
        session = open_session(root, entry, spec["file"], threads=int(spec["threads"]), allow_failed=True)
        for _ in range(3):
            session(inputs)
    else:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401

        from relaydiff.core import family

        torch.set_num_threads(int(spec["threads"]))
        inputs = load_fixture(root, manifest, spec["component"])[0]
        before = _rss_baseline()
        ref = family.resolve(Path(spec["family"]), manifest.family.device_variant, role="device")
        device = family.load(ref)
        size = sum(p.numel() * p.element_size() for p in device.unet.parameters()) if spec["component"] == "unet_step" else 0
        _torch_reference(device, spec["component"], inputs, BenchConfig(bundle=root, repeats=3, warmup=0, threads=int(spec["threads"])))
    peak = _peak_rss_bytes()
    out: dict[str, Any] = {"peak_rss_bytes": peak, "rss_rise_bytes": peak - before}
    if size:
        out["rss_rise_over_size"] = round((peak - before) / size, 3)
    return out


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a human-readable table (per-call latencies in ms)."""

    def ms(v: float | None) -> str:
        return f"{1000 * v:9.3f}" if v is not None else f"{'-':>9}"

    def mb(r: Mapping[str, Any]) -> str:
        if "rss_rise_bytes" not in r:
            return f"{'-':>8} {'-':>6}"
        over = r.get("rss_rise_over_size")
        return f"{r['rss_rise_bytes'] / 2**20:8.1f} " + (f"{over:5.1f}x" if over is not None else f"{'-':>6}")

    def x(v: float | None) -> str:
        return f"{v:6.2f}x" if v is not None else f"{'-':>7}"

    lines = [f"bundle {report['bundle']}  (family {report['family_id']}, {report['threads']} thread(s), median of {report['repeats']})",
             f"{'artifact':<44} {'bytes':>10} {'load ms':>9} {'call ms':>9} {'torch ms':>9} {'vs torch':>8} "
             f"{'RSS+ MB':>8} {'/size':>6} {'fp32/int8 size':>14} {'int8/fp32 ms':>12}"]
    for r in report["artifacts"]:
        if r["status"] != "ok":
            lines.append(f"{r['file']:<44} {r['size']:>10} {r['status']}")
            continue
        lines.append(f"{r['file']:<44} {r['size']:>10} {ms(r['load_seconds'])} {ms(r['call_seconds'])} "
                     f"{ms(r.get('torch_call_seconds'))} {x(r.get('ratio_vs_torch')):>8} {mb(r)} "
                     f"{x(r.get('fp32_size_over_int8')):>14} {x(r.get('call_vs_fp32')):>12}")
    for t in report["torch"]:
        lines.append(f"{'torch fp32 ' + t['component']:<44} {'':>10} {ms(t['load_seconds'])} {ms(t['call_seconds'])} "
                     f"{'':>9} {'':>8} {mb(t)}")
    et = [r for r in report["artifacts"] if r.get("delegate_calls") is not None]
    for r in et:
        lines.append(f"executorch {r['file']}: {r['delegate_calls']} XNNPACK delegate calls, {r['ops_outside_delegates']} ops outside")
    if report["relay"]:
        k, n = report["relay"][0]["device_steps"]
        lines.append(f"device half of a relay (steps [{k}, {n}) + decode):")
        for r in report["relay"]:
            lines.append(f"  {r['target'] + '/' + r['precision']:<20} {1000 * r['seconds']:10.1f} ms  {r['ratio_vs_torch']:6.2f}x torch")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":  # the peak-RSS child process of measure_rss
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        print(json.dumps(_rss_child(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m relaydiff.export.bench --rss-child SPEC_JSON (internal to bench device)")
