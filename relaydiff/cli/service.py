"""The ``relaydiff host`` and ``relaydiff device`` commands: serve relays from an edge host, or ask one as a device.

``relaydiff.cli`` registers these with :func:`add_parsers` and dispatches through :data:`COMMANDS`;
each command builds a config and calls relaydiff.host / relaydiff.runtime (which never see argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relaydiff.cli.output import message, result
from relaydiff.core.errors import RelaydiffError

TOKEN_ENV = "RELAYDIFF_TOKEN"  # where the link token comes from without --token-file (or --token)
MIN_TOKEN_CHARS = 16  # shortest link token accepted (a bearer secret)
MAX_TOKEN_FILE_BYTES = 4096
LOG_LEVELS = ("debug", "info", "warning", "error")
POLICIES = ("fixed", "rule", "bandit")  # relaydiff host --policy
HOST_NEEDS = "a host UNet and a device UNet (the host finishes a relay itself when a device cannot)"


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=25, help="denoising steps N (default 25)")
    p.add_argument("--scheduler", default=None,
                   help="sampler: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, pndm, unipc (default: the family folder's "
                        "own scheduler where supported, else ddim; a bundle's: the sampler it was built for)")
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
    p.add_argument("--token-file", help=f"file holding the link token devices must present (default ${TOKEN_ENV}, "
                                        "else a random one, printed once)")
    p.add_argument("--token", help="the link token itself (visible in the process list: prefer --token-file)")
    p.add_argument("--tls-cert", help="PEM certificate (chain) to serve wss:// (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--max-queue", type=int, default=64, help="requests in progress over all devices before busy (default 64)")
    p.add_argument("--max-per-device", type=int, default=4, help="requests in progress on one link before busy (default 4)")
    p.add_argument("--max-per-client", type=int, default=None,
                   help="requests in progress over all links of one client (its token) before busy (default: no cap "
                        "beyond --max-queue and the clients' fair shares)")
    p.add_argument("--client-tokens", metavar="FILE",
                   help="file of 'NAME TOKEN' lines: one token per client (quotas and fair share are per client; "
                        "devices sharing a token are one client). The --token-file token is client 'default'")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log level on stderr (default info)")
    p.add_argument("--policy", choices=POLICIES,
                   help="split policy: fixed (--fraction), rule (k from each request's quality preference) or bandit "
                        "(learns from devices' feedback); default: fixed with --fraction, else rule")
    p.add_argument("--fraction", type=float, help="share of the steps the host runs, for --policy fixed")
    p.add_argument("--bandit-state", help="JSON Lines file the bandit loads (if it exists) and keeps its state in")
    p.add_argument("--cache-budgets", default=None, metavar="B1,B2",
                   help="--policy bandit: device budgets as shares of N - k in (0, 1] that the arms also choose among "
                        "(1 = no caching; e.g. 1,0.5; default 1). The chosen budget travels in the relay state (docs/cache.md)")
    p.add_argument("--result-timeout", type=float, default=120.0, help="longest wait for a device's result after a hand-off, s")
    p.add_argument("--workers", type=int, default=1, help="threads running model steps (default 1)")
    p.add_argument("--refine-predictors", default="default",
                   help="strength predictors JSON that picks the refine strength of a reverse hand-off sent without "
                        "one; 'none': such a hand-off is refused (default: the family's preview/predictors.json if any)")
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
    p.add_argument("--trusted-key", help="Ed25519 public key PEM (relaydiff bundle keygen): run --bundle only if it signed it")
    add_client_link_args(p)
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="log level on stderr (default warning)")
    p.add_argument("--quality", type=float, default=0.5, help="0 = fastest .. 1 = best quality (default 0.5)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds to wait for the host before generating alone")
    p.add_argument("--denylist", default=None, metavar="FILE",
                   help="prompt denylist (one word or phrase a line, case-insensitive whole words), added to the bundle's")
    p.add_argument("--out", default="device.png", help="output PNG path (default device.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_settings_args(p)


def add_client_link_args(p: argparse.ArgumentParser) -> None:
    """How a device-side command reaches a host: the link token, TLS trust and connect timeout
    (``relaydiff device`` and ``relaydiff edit --host-url``); read back with :func:`client_link`."""
    p.add_argument("--token-file", help=f"file holding the link token (default ${TOKEN_ENV})")
    p.add_argument("--token", help="the link token itself (visible in the process list: prefer --token-file)")
    p.add_argument("--ca", help="PEM CA bundle to verify a wss:// host with (e.g. its self-signed certificate)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to reach the host (default 5)")


def client_link(args: argparse.Namespace, url: str) -> tuple[str, Any, Any]:
    """(link token, client SSLContext or None, LinkConfig) of :func:`add_client_link_args`' flags, for ``url``.

    Raises:
        RelaydiffError: no or a bad token, --ca with a ws:// URL or an unreadable CA, a timeout <= 0.
    """
    from relaydiff.link.config import LinkConfig

    if not url.startswith(("ws://", "wss://")):
        raise RelaydiffError(f"host URL {url!r} is not a ws:// or wss:// URL")
    token = _token(args, required=True)
    assert token is not None
    tls = _client_tls(args, url)
    if not args.connect_timeout > 0:
        raise RelaydiffError(f"--connect-timeout must be > 0 seconds, got {args.connect_timeout!r}")
    return token, tls, LinkConfig(open_timeout_s=args.connect_timeout, handshake_timeout_s=args.connect_timeout)


def _settings(args: argparse.Namespace, default_sampler: str) -> Any:
    """The generation settings of the flags; ``default_sampler`` when no --scheduler was given."""
    from relaydiff.runtime.settings import GenerationSettings

    return GenerationSettings(
        steps=args.steps, sampler=args.scheduler or default_sampler, guidance_scale=args.guidance, seed=args.seed,
        negative_prompt=args.negative_prompt,
    )


def _backend_sampler(backend: Any) -> str:
    """The sampler a device backend runs by default: its family folder's own scheduler where supported (torch),
    the sampler its bundle was built for (onnx, executorch)."""
    from relaydiff.core import family
    from relaydiff.runtime.backends import BundleBackend, TorchBackend

    if isinstance(backend, TorchBackend):
        return family.default_sampler(backend.model.ref)
    if isinstance(backend, BundleBackend):
        return backend.manifest.scheduler.sampler
    return "ddim"


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


def _client_tokens(path_arg: str | None) -> dict[str, str]:
    """``--client-tokens FILE``: client name -> token, one ``NAME TOKEN`` a line (blank lines and ``#`` comments
    skipped); each token at least MIN_TOKEN_CHARS long. Tokens are never quoted in errors.

    Raises:
        RelaydiffError: an unreadable file, a malformed line, a short token, or a name given twice.
    """
    if path_arg is None:
        return {}
    path = Path(path_arg)
    try:
        if path.stat().st_size > 1 << 20:
            raise RelaydiffError(f"--client-tokens {str(path)!r} is {path.stat().st_size} bytes; at most 1 MiB is read")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RelaydiffError(f"--client-tokens {str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise RelaydiffError(f"--client-tokens {str(path)!r} line {number}: expected 'NAME TOKEN' ({len(parts)} fields)")
        name, token = parts
        if name in tokens:
            raise RelaydiffError(f"--client-tokens {str(path)!r} line {number}: client {name!r} is named twice")
        if len(token) < MIN_TOKEN_CHARS:
            raise RelaydiffError(f"--client-tokens {str(path)!r} line {number}: the token of {name!r} is {len(token)} "
                                 f"characters; at least {MIN_TOKEN_CHARS} are required")
        tokens[name] = token
    return tokens


def _token(args: argparse.Namespace, *, required: bool) -> str | None:
    """The link token from --token-file, --token or $RELAYDIFF_TOKEN (in that order), at least MIN_TOKEN_CHARS long.

    Raises:
        RelaydiffError: an unreadable token file, a token too short or too long, or none when ``required``.
    """
    if args.token_file is not None and args.token is not None:
        raise RelaydiffError("pass the link token once: --token-file or --token, not both")
    if args.token_file is not None:
        path = Path(args.token_file)
        try:
            if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
                raise RelaydiffError(f"--token-file {str(path)!r} is {path.stat().st_size} bytes; a token file holds one line")
            token: str | None = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise RelaydiffError(f"--token-file {str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        source = f"--token-file {str(path)!r}"
    elif args.token is not None:
        token, source = args.token, "--token"
    else:
        token, source = os.environ.get(TOKEN_ENV) or None, f"${TOKEN_ENV}"
    if token is None:
        if required:
            raise RelaydiffError(f"no link token: pass --token-file FILE or set ${TOKEN_ENV}")
        return None
    if len(token) < MIN_TOKEN_CHARS:  # the token itself is never quoted
        raise RelaydiffError(f"the link token from {source} is {len(token)} characters; at least {MIN_TOKEN_CHARS} are required")
    if len(token.encode("utf-8")) > 256:
        raise RelaydiffError(f"the link token from {source} is {len(token.encode('utf-8'))} bytes; the protocol allows 256")
    return token


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """Structured (key=value) logs of the link, host and device on stderr at --log-level, for the command's
    duration (removed after, so that in-process callers keep their own logging); secrets are never logged."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("relaydiff.link", "relaydiff.host", "relaydiff.runtime")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(args.log_level.upper())
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _server_tls(args: argparse.Namespace) -> Any:
    """The SSLContext of --tls-cert/--tls-key, or None."""
    import ssl

    if (args.tls_cert is None) != (args.tls_key is None):
        raise RelaydiffError("--tls-cert and --tls-key go together")
    if args.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise RelaydiffError(f"--tls-cert {args.tls_cert!r} / --tls-key {args.tls_key!r} cannot be loaded: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


def _client_tls(args: argparse.Namespace, url: str) -> Any:
    """The client SSLContext trusting --ca for a wss:// host, or None (the system's trust for wss://)."""
    import ssl

    if args.ca is None:
        return None
    if not url.startswith("wss://"):
        raise RelaydiffError(f"--ca applies to a wss:// host, not {url!r}")
    try:
        return ssl.create_default_context(cafile=args.ca)
    except (OSError, ssl.SSLError) as exc:
        raise RelaydiffError(f"--ca {args.ca!r} cannot be loaded: {getattr(exc, 'strerror', None) or exc}") from None


def _policy(args: argparse.Namespace) -> Any:
    """The split policy of ``relaydiff host`` from --policy, --fraction and --bandit-state."""
    from relaydiff.host.policy import FixedPolicy

    name = args.policy or ("fixed" if args.fraction is not None else "rule")
    if args.bandit_state is not None and name != "bandit":
        raise RelaydiffError(f"--bandit-state applies to --policy bandit, not --policy {name}")
    if getattr(args, "cache_budgets", None) is not None and name != "bandit":
        raise RelaydiffError(f"--cache-budgets applies to --policy bandit, not --policy {name}")
    if name == "fixed":
        if args.fraction is None:
            raise RelaydiffError("--policy fixed needs --fraction F (the share of the steps the host runs, in [0, 1])")
        return FixedPolicy(fraction=args.fraction)
    if args.fraction is not None:
        raise RelaydiffError(f"--fraction applies to --policy fixed, not --policy {name}")
    if name == "rule":
        return FixedPolicy()
    from relaydiff.host.bandit import BanditConfig, BanditPolicy

    config = BanditConfig() if getattr(args, "cache_budgets", None) is None else BanditConfig(budgets=_shares(args.cache_budgets))
    if args.bandit_state is None:
        return BanditPolicy(config)
    path = Path(args.bandit_state)
    if path.exists():
        bandit = BanditPolicy.load(path, state_path=path, autosave=False)
        if bandit.config.budgets != config.budgets and args.cache_budgets is not None:
            raise RelaydiffError(f"--bandit-state {str(path)!r} was written with budgets {list(bandit.config.budgets)}; "
                                 f"--cache-budgets asks for {list(config.budgets)} (use another state file)")
    else:
        bandit = BanditPolicy(config, state_path=path, autosave=False)
    try:
        bandit.flush()  # fail now, not at the first feedback, when the file cannot be written
    except OSError as exc:
        raise RelaydiffError(f"--bandit-state {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    return bandit


def _shares(text: str) -> tuple[float, ...]:
    """--cache-budgets: a comma list of numbers (BanditConfig checks the range)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise RelaydiffError(f"--cache-budgets must be comma-separated numbers in (0, 1], got {text!r}") from None


def _emit(args: argparse.Namespace, payload: dict[str, Any], lines: list[str]) -> None:
    result(json.dumps(payload) if args.json else "\n".join(lines))


def cmd_host(args: argparse.Namespace) -> int:
    from relaydiff.core import family
    from relaydiff.host.controller import HostConfig
    from relaydiff.link.config import LinkConfig

    listen_host, port = parse_listen(args.listen)
    root = family.require_family(args.family, needed=HOST_NEEDS) if args.family else family.default_family_dir()
    sampler = family.default_sampler(family.resolve(root, args.host_variant, role="host"))
    token = _token(args, required=False)
    generated = token is None
    token = token or secrets.token_urlsafe(18)
    if args.duration is not None and not args.duration > 0:
        raise RelaydiffError(f"--duration must be > 0 seconds, got {args.duration!r}")
    config = HostConfig(
        settings=_settings(args, sampler), listen_host=listen_host, port=port, result_timeout_s=args.result_timeout,
        workers=args.workers, max_queue=args.max_queue, max_requests_per_session=args.max_per_device,
        max_requests_per_client=args.max_per_client, link=LinkConfig(),
    )
    args.client_token_map = _client_tokens(args.client_tokens)
    tls = _server_tls(args)
    policy = _policy(args)
    with _logging(args):
        return _serve_host(args, root, config, token, generated, tls, policy, listen_host)


def _serve_host(args: argparse.Namespace, root: Path, config: Any, token: str, generated: bool, tls: Any, policy: Any,
                listen_host: str) -> int:
    from relaydiff.host.controller import HostServer

    if tls is None and listen_host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("relaydiff.host").warning(
            "serving ws:// on %s without TLS: the link token travels in cleartext (use --tls-cert/--tls-key)", listen_host)
    server = HostServer.from_family(
        root, auth_token=token, host_variant=args.host_variant, device_variant=args.device_variant,
        policy=policy, config=config, ssl=tls, client_tokens=args.client_token_map,
        refine_predictors=None if args.refine_predictors == "none" else args.refine_predictors,
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
            message(f"relaydiff host listening on {server.url}" + (f" (token {token})" if generated else ""))
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
    payload = {"requests": len(entries), "by_source": by_source, "refused_duplicates": server.ledger.refused_count,
               "seconds": round(seconds, 2), "settings": config.settings.to_dict(), "policy": type(policy).__name__,
               "stats": dataclasses.asdict(server.stats)}
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
        if args.trusted_key:
            raise RelaydiffError(f"--trusted-key {args.trusted_key!r} applies to a bundle (--bundle); the torch backend runs a family folder")
        return name, {"family_dir": args.family, "variant": args.device_variant}
    if not args.bundle:
        raise RelaydiffError(f"--backend {name!r} runs a bundle: pass --bundle DIR")
    if args.device_variant:
        raise RelaydiffError("--device-variant applies to --backend torch; a bundle holds one device variant")
    return name, {"bundle_dir": args.bundle, "precision": args.precision, "family_dir": args.family, "trusted_key": args.trusted_key}


def cmd_device(args: argparse.Namespace) -> int:
    from PIL import Image

    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime

    token, tls, link = client_link(args, args.connect)
    name, options = _backend_options(args)
    runtime = DeviceRuntime(create_backend(name, **options), denylist=args.denylist)
    settings = _settings(args, _backend_sampler(runtime.backend))
    client = DeviceClient(runtime, args.connect, auth_token=token, settings=settings, quality_preference=args.quality,
                          deadline_s=args.deadline, link_config=link, ssl=tls)
    with _logging(args):
        outcome = asyncio.run(client.generate(args.prompt))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(outcome.image).save(out)
    payload = {"image": str(out), "mode": outcome.mode, "relay_step": outcome.relay_step, "steps": outcome.steps,
               "latency_s": round(outcome.latency_s, 4), "timings": {k: round(v, 4) for k, v in outcome.timings.items()},
               "fallback_reason": outcome.fallback_reason, "request_id": outcome.request_id, "prompt": outcome.prompt,
               "scheduler": settings.sampler, "safety": outcome.safety.to_json()}
    lines = [f"wrote {out}  ({outcome.mode}, k={outcome.relay_step}/{outcome.steps}, {outcome.latency_s:.3f} s)"]
    if outcome.fallback_reason:
        lines.append(f"generated on the device alone: {outcome.fallback_reason}")
    if outcome.safety.nsfw:
        lines.append("the safety checker flagged the image: a black image was written instead")
    elif not outcome.safety.checked:
        lines.append("safety: no safety checker ran (the backend has none)")
    _emit(args, payload, lines)
    return 0


COMMANDS = {"host": cmd_host, "device": cmd_device}
