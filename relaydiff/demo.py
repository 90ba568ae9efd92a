"""``relaydiff demo``: the host-device relay end to end on loopback, under changing network conditions.

1. Build the device bundle of the family (ONNX, the precision asked for), or reuse the one in the output
   folder when it was built from the same weights.
2. Start the edge controller (:class:`~relaydiff.host.controller.HostServer`, host model + the contextual
   bandit) on 127.0.0.1, and a device runtime that runs the bundle with onnxruntime.
3. Put a network between them: ``tc netem`` where the kernel has it, else the in-process
   :class:`~relaydiff.link.shaper.ShapingProxy`; the report says which. The regimes change over the run
   (Wi-Fi, 4G, a slow 3G link, offline, Wi-Fi again).
4. Send a handful of prompts; for each, print what the scheduler chose and what it cost, score the image
   with the independent scorer (that score is the device's quality feedback), and finally write a PNG grid
   comparing host-only, relay and device-only images of every prompt (same seed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from relaydiff.core.errors import RelaydiffError
from relaydiff.link.shaper import NetworkConditions

TOKEN = "relaydiff-demo-token"
DEFAULT_PROMPTS = (
    "a large red circle in the centre",
    "a small blue square at the top on a white background",
    "a large yellow triangle left of a small green circle",
    "a large purple diamond above a small orange square",
    "a small cyan circle right of a large red triangle",
    "a small green square below a large blue diamond on a gray background",
)
# (conditions, or None for offline); one prompt per regime, cycling
DEFAULT_REGIMES: tuple[NetworkConditions | None, ...] = (
    NetworkConditions("wifi", 8.0, 100.0),
    NetworkConditions("4g", 60.0, 12.0),
    NetworkConditions("3g-slow", 400.0, 0.8),
    None,
    NetworkConditions("wifi", 8.0, 100.0),
    NetworkConditions("4g", 60.0, 12.0),
)
OFFLINE = "offline"


@dataclass(frozen=True)
class DemoConfig:
    """What ``relaydiff demo`` runs."""

    out_dir: Path = Path("out/demo")  # bundle, report.json, grid.png
    family: Path | None = None  # None: the embedded default family
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    regimes: tuple[NetworkConditions | None, ...] = DEFAULT_REGIMES  # None = offline
    steps: int = 25  # N
    guidance_scale: float = 5.0
    precision: str = "fp32"  # device bundle precision: fp32 or int8
    quality_preference: float = 0.6  # the user's quality weight w in [0, 1]
    seed: int = 0
    rebuild: bool = False  # build the bundle even when a matching one exists
    extra: dict[str, Any] = field(default_factory=dict)  # passed to BundleConfig (tests shrink calibration)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise RelaydiffError("the demo needs at least one prompt")
        if not self.regimes:
            raise RelaydiffError("the demo needs at least one network regime")
        if self.precision not in ("fp32", "int8"):
            raise RelaydiffError(f"precision must be 'fp32' or 'int8', got {self.precision!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 2 <= self.steps <= 200:
            raise RelaydiffError(f"steps must be an integer in [2, 200], got {self.steps!r}")
        if not 0.0 <= self.quality_preference <= 1.0:
            raise RelaydiffError(f"quality preference must be in [0, 1], got {self.quality_preference!r}")


def _weights_digest(family_dir: Path) -> str:
    """sha256 over the device UNet, VAE and text-encoder weights and configs (decides bundle reuse)."""
    h = hashlib.sha256()
    for sub in ("unet_device", "vae", "text_encoder", "tokenizer", "scheduler"):
        for p in sorted((family_dir / sub).glob("*")):
            if p.is_file():
                h.update(p.relative_to(family_dir).as_posix().encode() + b"\0")
                with p.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()


def ensure_bundle(config: DemoConfig, family_dir: Path, log: Callable[[str], None]) -> tuple[Path, bool]:
    """The bundle folder to run, and whether it was reused (built from the same weights and verified)."""
    import shutil

    from relaydiff.export.bundle import BundleConfig, build, verify

    bundle = config.out_dir / "bundle"
    stamp = config.out_dir / "bundle.source.json"
    digest = _weights_digest(family_dir)
    if not config.rebuild and bundle.is_dir() and stamp.is_file():
        try:
            source = json.loads(stamp.read_text())
        except (OSError, ValueError):
            source = {}
        if (source.get("weights_sha256") == digest and source.get("steps") == config.steps
                and config.precision in source.get("precisions", []) and verify(bundle, parity=False).ok):
            log(f"reusing the bundle in {bundle} (same weights, hashes verified)")
            return bundle, True
    shutil.rmtree(bundle, ignore_errors=True)
    (config.out_dir / "bundle.zip").unlink(missing_ok=True)
    precisions = ("fp32",) if config.precision == "fp32" else ("fp32", "int8")
    log(f"building the {'/'.join(precisions)} ONNX bundle of {family_dir} into {bundle}")
    build(BundleConfig(family=family_dir, out=bundle, targets=("onnx",), precisions=precisions, steps=config.steps,
                       relay_step=max(1, round(0.3 * config.steps)), zip=False, **config.extra), progress=True)
    stamp.write_text(json.dumps({"weights_sha256": digest, "steps": config.steps, "precisions": list(precisions)}) + "\n")
    return bundle, False


def _quality(image: Any, prompt: str) -> float:
    from relaydiff.scorer import score

    return float(score(image, prompt).attribute_accuracy)


async def _serve_and_ask(config: DemoConfig, family_dir: Path, bundle: Path, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], str]:
    from relaydiff.host.bandit import BanditConfig, BanditPolicy
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.link import LinkConfig
    from relaydiff.link.shaper import ShapingProxy, netem_unavailable_reason
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime
    from relaydiff.runtime.settings import GenerationSettings

    settings = GenerationSettings(steps=config.steps, guidance_scale=config.guidance_scale, seed=config.seed)
    why_not_netem = netem_unavailable_reason()
    # The netem path is not implemented: no machine this project runs on has sch_netem to exercise it.
    emulation = (f"in-process shaping proxy (tc netem unavailable: {why_not_netem})" if why_not_netem
                 else "in-process shaping proxy (tc netem is available here, but relaydiff does not drive it yet)")
    link_config = LinkConfig(open_timeout_s=3.0, recv_timeout_s=120.0)
    policy = BanditPolicy(BanditConfig(seed=config.seed, latency_scale_s=10.0))
    host = HostServer.from_family(family_dir, auth_token=TOKEN, policy=policy,
                                  config=HostConfig(settings=settings, link=link_config))
    runtime = DeviceRuntime(create_backend("onnx", bundle_dir=bundle, precision=config.precision, family_dir=family_dir))
    rows: list[dict[str, Any]] = []
    async with host:
        port = int(host.url.rstrip("/").rsplit(":", 1)[1])
        async with ShapingProxy("127.0.0.1", port, config.regimes[0] or NetworkConditions("wifi", 8.0, 100.0)) as proxy:
            client = DeviceClient(runtime, proxy.url(), auth_token=TOKEN, settings=settings,
                                  quality_preference=config.quality_preference, deadline_s=60.0,
                                  link_config=link_config, quality_fn=_quality)
            for i, prompt in enumerate(config.prompts):
                regime = config.regimes[i % len(config.regimes)]
                if regime is None:
                    proxy.set_offline()
                else:
                    proxy.set_conditions(regime)
                before = proxy.bytes_forwarded
                outcome = await client.generate(prompt)
                entry = next((e for e in host.ledger.entries() if e.key.endswith("/" + outcome.request_id)), None)
                host_s = entry.timings.get("host_s") if entry is not None else None
                device_s = sum(outcome.timings.get(k, 0.0) for k in ("device_s", "decode_s", "encode_s"))
                handoff_s = outcome.timings.get("handoff_s")
                transfer_ms = None
                if handoff_s is not None and host_s is not None:
                    transfer_ms = 1000.0 * max(handoff_s - host_s, 0.0)  # request + queue + hand-off on the link
                quality = _quality(outcome.image, prompt)
                rows.append({
                    "prompt": prompt,
                    "network": regime.name if regime is not None else OFFLINE,
                    "rtt_ms": regime.rtt_ms if regime is not None else None,
                    "bandwidth_mbit_s": regime.bandwidth_mbit_s if regime is not None else None,
                    "mode": outcome.mode,
                    "relay_step": outcome.relay_step,
                    "steps": outcome.steps,
                    "host_s": host_s,
                    "transfer_ms": transfer_ms,
                    "device_s": device_s,
                    "end_to_end_s": outcome.latency_s,
                    "link_bytes": proxy.bytes_forwarded - before,
                    "quality": quality,
                    "correct": quality == 1.0,
                    "fallback_reason": outcome.fallback_reason,
                    "image": outcome.image,
                })
                log(format_row(rows[-1]))
    return rows, emulation


def _comparison_grid(config: DemoConfig, family_dir: Path, rows: list[dict[str, Any]]) -> Any:
    """Host-only, the relay each request got (or 30% when it got none), and device-only, per prompt (torch)."""
    import numpy as np

    from relaydiff.core import family
    from relaydiff.core.relay import RelayRequest, relay

    host = family.load(family.resolve(family_dir, None, role="host"))
    device = family.load(family.resolve(family_dir, None, role="device"), share_with=host)
    images, labels = [], []
    for row in rows:
        n = config.steps
        k = row["relay_step"] if 0 < row["relay_step"] < n else max(1, round(0.3 * n))
        for kk in (n, k, 0):
            req = RelayRequest(row["prompt"], relay_step=kk, steps=n, guidance_scale=config.guidance_scale, seed=config.seed)
            img = relay(host, device, req).images[0]
            images.append(img)
            labels.append(_quality(img, row["prompt"]))
    return np.stack(images), labels


def _write_grid(path: Path, images: Any, qualities: list[float], prompts: list[str], steps: int, ks: list[int]) -> None:
    from PIL import Image, ImageDraw

    scale, pad, label_w, head_h = 4, 6, 330, 22
    h, w = images.shape[1] * scale, images.shape[2] * scale
    rows = len(prompts)
    canvas = Image.new("RGB", (label_w + 3 * (w + pad), head_h + rows * (h + pad + 12)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("host-only", "relay", "device-only")):
        draw.text((label_w + c * (w + pad), 4), title, fill="black")
    for r, prompt in enumerate(prompts):
        y = head_h + r * (h + pad + 12)
        draw.text((4, y + h // 2 - 6), prompt[:52], fill="black")
        for c in range(3):
            i = 3 * r + c
            tile = Image.fromarray(images[i]).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (w + pad), y))
            k = (steps, ks[r], 0)[c]
            draw.text((label_w + c * (w + pad), y + h + 1), f"k={k} q={qualities[i]:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


HEADER = (f"{'network':<8} {'mode':<11} {'k/N':>6} {'host s':>7} {'xfer ms':>8} {'device s':>8} {'e2e s':>6} "
          f"{'quality':>7}  prompt")


def format_row(r: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        width = int(fmt.split(".")[0]) if fmt[0].isdigit() else 0
        return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)

    return (f"{r['network']:<8} {r['mode']:<11} {str(r['relay_step']) + '/' + str(r['steps']):>6} {num(r['host_s'], '7.2f')} "
            f"{num(r['transfer_ms'], '8.1f')} {num(r['device_s'], '8.2f')} {r['end_to_end_s']:6.2f} {r['quality']:7.2f}  {r['prompt']}")


def run_demo(config: DemoConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``out_dir/report.json``) and writes ``grid.png``."""
    from relaydiff.core import family

    say = log or (lambda _m: None)
    family_dir = Path(config.family) if config.family is not None else family.default_family_dir()
    if not family_dir.is_dir():
        raise RelaydiffError(f"family folder {str(family_dir)!r} does not exist")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle, reused = ensure_bundle(config, family_dir, say)
    build_s = time.perf_counter() - t0
    say(HEADER)
    rows, emulation = asyncio.run(_serve_and_ask(config, family_dir, bundle, say))
    images, qualities = _comparison_grid(config, family_dir, rows)
    ks = [r["relay_step"] if 0 < r["relay_step"] < config.steps else max(1, round(0.3 * config.steps)) for r in rows]
    grid = config.out_dir / "grid.png"
    _write_grid(grid, images, qualities, [r["prompt"] for r in rows], config.steps, ks)
    report = {
        "family": str(family_dir),
        "bundle": str(bundle),
        "bundle_reused": reused,
        "bundle_seconds": round(build_s, 2),
        "device_backend": f"onnxruntime ({config.precision})",
        "network_emulation": emulation,
        "steps": config.steps,
        "quality_preference": config.quality_preference,
        "requests": [{k: v for k, v in r.items() if k != "image"} for r in rows],
        "grid_png": str(grid),
        "grid_quality": {"host_only": qualities[0::3], "relay": qualities[1::3], "device_only": qualities[2::3]},
    }
    (config.out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
