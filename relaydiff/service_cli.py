"""The ``relaydiff host`` and ``relaydiff device`` commands: serve relays from an edge host, or ask one as a device.

``relaydiff.cli`` registers these with :func:`add_parsers` and dispatches through :data:`COMMANDS`;
each command builds a config and calls relaydiff.host / relaydiff.runtime (which never see argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from relaydiff.core.errors import RelaydiffError

TOKEN_ENV = "RELAYDIFF_TOKEN"  # where --token defaults from
POLICIES = ("fixed", "rule", "bandit")  # relaydiff host --policy


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=25, help="denoising steps N (default 25)")
    p.add_argument("--scheduler", default="ddim", help="sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_sde")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")


def add_parsers(subparsers: Any) -> None:
    """Add the ``host`` and ``device`` subcommands to ``relaydiff``'s subparsers."""
    p = subparsers.add_parser("host", help="serve relays to devices over the link (the edge controller)")
    p.add_argument("--family", help="family folder with host and device variants (default: the embedded family)")
    p.add_argument("--host-variant", help="family variant to use as host (default: the family's default_host)")
    p.add_argument("--device-variant", help="variant the host finishes with when a device does not (default_device)")
    p.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT to bind (default 127.0.0.1:8765; port 0 = any free)")
    p.add_argument("--token", help=f"link token devices must present (default ${TOKEN_ENV}, else a random one, printed)")
    p.add_argument("--policy", choices=POLICIES,
                   help="split policy: fixed (--fraction), rule (k from each request's quality preference) or bandit "
                        "(learns from devices' feedback); default: fixed with --fraction, else rule")
    p.add_argument("--fraction", type=float, help="share of the steps the host runs, for --policy fixed")
    p.add_argument("--bandit-state", help="JSON Lines file the bandit loads (if it exists) and keeps its state in")
    p.add_argument("--result-timeout", type=float, default=120.0, help="longest wait for a device's result after a hand-off, s")
    p.add_argument("--workers", type=int, default=1, help="threads running model steps (default 1)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until interrupted)")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    _add_settings_args(p)

    p = subparsers.add_parser("device", help="ask a host for an image and finish it on this device")
    p.add_argument("--connect", required=True, help="the host's ws:// or wss:// URL")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--family", help="family folder holding the device variant (default: the embedded family)")
    p.add_argument("--device-variant", help="family variant to run (default: the family's default_device)")
    p.add_argument("--backend", help="device runtime backend: torch, onnx, executorch (default torch; onnx with --bundle)")
    p.add_argument("--bundle", help="bundle folder (relaydiff bundle build) to run with --backend onnx or executorch")
    p.add_argument("--precision", default="fp32", help="bundle artifacts to run: fp32 or int8 (default fp32)")
    p.add_argument("--token", help=f"link token (default ${TOKEN_ENV})")
    p.add_argument("--quality", type=float, default=0.5, help="0 = fastest .. 1 = best quality (default 0.5)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds to wait for the host before generating alone")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to reach the host (default 5)")
    p.add_argument("--out", default="device.png", help="output PNG path (default device.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_settings_args(p)


def _settings(args: argparse.Namespace) -> Any:
    from relaydiff.runtime.settings import GenerationSettings

    return GenerationSettings(
        steps=args.steps, sampler=args.scheduler, guidance_scale=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt,
    )


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8765"`` -> ("127.0.0.1", 8765); ``[::1]:80`` is accepted too.

    Raises:
        RelaydiffError: not HOST:PORT with a port in [0, 65535].
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise RelaydiffError(f"--listen must be HOST:PORT with a port in [0, 65535], got {text!r}")
    return host, int(port)


def _policy(args: argparse.Namespace) -> Any:
    """The split policy of ``relaydiff host`` from --policy, --fraction and --bandit-state."""
    from relaydiff.host.policy import FixedPolicy

    name = args.policy or ("fixed" if args.fraction is not None else "rule")
    if args.bandit_state is not None and name != "bandit":
        raise RelaydiffError(f"--bandit-state applies to --policy bandit, not --policy {name}")
    if name == "fixed":
        if args.fraction is None:
            raise RelaydiffError("--policy fixed needs --fraction F (the share of the steps the host runs, in [0, 1])")
        return FixedPolicy(fraction=args.fraction)
    if args.fraction is not None:
        raise RelaydiffError(f"--fraction applies to --policy fixed, not --policy {name}")
    if name == "rule":
        return FixedPolicy()
    from relaydiff.host.bandit import BanditConfig, BanditPolicy

    if args.bandit_state is None:
        return BanditPolicy(BanditConfig())
    path = Path(args.bandit_state)
    if path.exists():
        bandit = BanditPolicy.load(path, state_path=path, autosave=False)
    else:
        bandit = BanditPolicy(BanditConfig(), state_path=path, autosave=False)
    try:
        bandit.flush()  # fail now, not at the first feedback, when the file cannot be written
    except OSError as exc:
        raise RelaydiffError(f"--bandit-state {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    return bandit


def _emit(args: argparse.Namespace, payload: dict[str, Any], lines: list[str]) -> None:
    print(json.dumps(payload) if args.json else "\n".join(lines))


def cmd_host(args: argparse.Namespace) -> int:
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.link.config import LinkConfig

    listen_host, port = parse_listen(args.listen)
    token = args.token or os.environ.get(TOKEN_ENV)
    generated = token is None
    token = token or secrets.token_urlsafe(18)
    if args.duration is not None and not args.duration > 0:
        raise RelaydiffError(f"--duration must be > 0 seconds, got {args.duration!r}")
    config = HostConfig(
        settings=_settings(args), listen_host=listen_host, port=port, result_timeout_s=args.result_timeout,
        workers=args.workers, link=LinkConfig(),
    )
    policy = _policy(args)
    server = HostServer.from_family(
        args.family, auth_token=token, host_variant=args.host_variant, device_variant=args.device_variant,
        policy=policy, config=config,
    )

    async def run() -> float:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (RuntimeError, ValueError, NotImplementedError):
                pass  # not the main thread (or no signals here): --duration or the caller stops us
        t0 = time.monotonic()
        async with server:
            print(f"relaydiff host listening on {server.url}" + (f" (token {token})" if generated else ""), file=sys.stderr, flush=True)
            try:
                await asyncio.wait_for(stop.wait(), args.duration)
            except TimeoutError:
                pass
        return time.monotonic() - t0

    seconds = asyncio.run(run())
    entries = server.ledger.entries()
    by_source: dict[str, int] = {}
    for e in entries:
        name = e.source.value if e.source is not None else "pending"
        by_source[name] = by_source.get(name, 0) + 1
    payload = {"requests": len(entries), "by_source": by_source, "refused_duplicates": len(server.ledger.refused),
               "seconds": round(seconds, 2), "settings": config.settings.to_dict(), "policy": type(policy).__name__}
    if args.bandit_state is not None:
        payload["bandit_observations"] = len(policy.history)
    _emit(args, payload, [f"served {len(entries)} requests in {seconds:.1f} s: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items()))])
    return 0


def _backend_options(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(backend name, its options) from the device command's flags: torch runs a family, onnx/executorch a bundle."""
    name = args.backend or ("onnx" if args.bundle else "torch")
    if name == "torch":
        if args.bundle:
            raise RelaydiffError(f"--bundle {args.bundle!r} needs --backend onnx or executorch, not torch")
        if args.precision != "fp32":
            raise RelaydiffError(f"--precision {args.precision!r} applies to a bundle (--bundle); the torch backend runs fp32")
        return name, {"family_dir": args.family, "variant": args.device_variant}
    if not args.bundle:
        raise RelaydiffError(f"--backend {name!r} runs a bundle: pass --bundle DIR")
    if args.device_variant:
        raise RelaydiffError("--device-variant applies to --backend torch; a bundle holds one device variant")
    return name, {"bundle_dir": args.bundle, "precision": args.precision, "family_dir": args.family}


def cmd_device(args: argparse.Namespace) -> int:
    from PIL import Image

    from relaydiff.link.config import LinkConfig
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise RelaydiffError(f"no link token: pass --token or set ${TOKEN_ENV}")
    if not args.connect_timeout > 0:
        raise RelaydiffError(f"--connect-timeout must be > 0 seconds, got {args.connect_timeout!r}")
    settings = _settings(args)
    name, options = _backend_options(args)
    runtime = DeviceRuntime(create_backend(name, **options))
    link = LinkConfig(open_timeout_s=args.connect_timeout, handshake_timeout_s=args.connect_timeout)
    client = DeviceClient(runtime, args.connect, auth_token=token, settings=settings, quality_preference=args.quality,
                          deadline_s=args.deadline, link_config=link)
    outcome = asyncio.run(client.generate(args.prompt))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(outcome.image).save(out)
    payload = {"image": str(out), "mode": outcome.mode, "relay_step": outcome.relay_step, "steps": outcome.steps,
               "latency_s": round(outcome.latency_s, 4), "timings": {k: round(v, 4) for k, v in outcome.timings.items()},
               "fallback_reason": outcome.fallback_reason, "request_id": outcome.request_id, "prompt": outcome.prompt}
    lines = [f"wrote {out}  ({outcome.mode}, k={outcome.relay_step}/{outcome.steps}, {outcome.latency_s:.3f} s)"]
    if outcome.fallback_reason:
        lines.append(f"generated on the device alone: {outcome.fallback_reason}")
    _emit(args, payload, lines)
    return 0


COMMANDS = {"host": cmd_host, "device": cmd_device}
