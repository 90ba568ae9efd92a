"""``relaydiff relay | resume | diagnose | check``: one relayed generation, its device half, its latent diagnostic,
and the compatibility check of a host/device pair."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from relaydiff.cli.common import add_json, add_pair_args, add_request_args
from relaydiff.cli.output import emit
from relaydiff.core.errors import CompatibilityError, RelaydiffError


def register(sub: Any) -> None:
    p = sub.add_parser("relay", help="run one relayed generation and write the image")
    add_pair_args(p)
    add_request_args(p)
    p.add_argument("--out", default="relay.png", help="output PNG path")
    p.add_argument("--state-out", help="also write the relay state handed over at step k (safetensors bytes)")
    p.add_argument("--cache-budget", type=int, default=None,
                   help="B in [1, N - k]: full UNet passes the device spends on its steps, the others from cached deep "
                        "features (the family's learned schedule; docs/cache.md). Default: every step full")
    add_json(p)
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("resume", help="device half only: finish a saved relay state and decode it")
    p.add_argument("--state", required=True, help="relay state file written by `relaydiff relay --state-out`")
    p.add_argument("--device", help="device model folder (default: the embedded family's device variant)")
    p.add_argument("--device-variant", help="family variant to use as device (default: the folder's default_device)")
    p.add_argument("--out", default="resume.png", help="output PNG path")
    p.add_argument("--cache-budget", type=int, default=None,
                   help="B in [1, N - k]: full UNet passes to spend (overrides the state's own budget; default: the state's)")
    add_json(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("diagnose", help="latent diagnostic: ||x_t|| per step for host-only, relay and device-only")
    add_pair_args(p)
    add_request_args(p)
    p.add_argument("--out-dir", default="diagnostic", help="folder for diagnostic.json/.csv/.png")
    add_json(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("check", help="check that a host and a device model can relay (exit 1 and every mismatch if not)")
    add_pair_args(p)
    add_json(p)
    p.set_defaults(func=cmd_check)


def resolve_pair(args: argparse.Namespace) -> tuple[Any, Any]:
    """(host ref, device ref) from --family / --host / --device; checked to relay.

    Raises:
        RelaydiffError: only one of --host / --device without --family (naming the missing one), a plain
            pipeline folder as --family, or a pair that cannot relay.
    """
    from relaydiff.core import family

    fam = args.family
    if fam is None:
        if args.host is None and args.device is None:
            fam = str(family.default_family_dir())
        elif args.device is None:
            raise RelaydiffError(f"--host {args.host!r} needs a device: pass --device DIR (or --family DIR); "
                                 "relaydiff does not pair it with the embedded device")
        elif args.host is None:
            raise RelaydiffError(f"--device {args.device!r} needs a host: pass --host DIR (or --family DIR); "
                                 "relaydiff does not pair it with the embedded host")
    if fam is not None and (args.host is None or args.device is None):
        family.require_family(fam, needed="a host and a device UNet (or give --host and --device)")
    host = family.resolve(args.host or fam, args.host_variant, role="host")
    device = family.resolve(args.device or fam, args.device_variant, role="device")
    family.check_pair(host, device)
    return host, device


def request(args: argparse.Namespace, ref: Any) -> Any:
    """The RelayRequest of the flags; the sampler defaults to the host folder's own scheduler."""
    from relaydiff.core import family
    from relaydiff.core.relay import RelayRequest

    k = args.relay_step if args.relay_step is not None else round(0.3 * args.steps)
    sampler = args.scheduler or family.default_sampler(ref)
    return RelayRequest(
        prompt=args.prompt, relay_step=k, steps=args.steps, sampler=sampler, guidance_scale=args.guidance,
        seed=args.seed, negative_prompt=args.negative_prompt, cache_budget=getattr(args, "cache_budget", None),
    )


def load_pair(host_ref: Any, device_ref: Any) -> tuple[Any, Any]:
    from relaydiff.core import family

    host = family.load(host_ref)
    device = family.load(device_ref, share_with=host)
    return host, device


def cmd_relay(args: argparse.Namespace) -> int:
    from PIL import Image

    from relaydiff.core.relay import relay

    host_ref, device_ref = resolve_pair(args)
    req = request(args, host_ref)
    t0 = time.perf_counter()
    host, device = load_pair(host_ref, device_ref)
    load_s = time.perf_counter() - t0
    res = relay(host, device, req, progress=not args.json)
    if args.state_out:
        Path(args.state_out).write_bytes(res.handoff)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(res.images[0]).save(out)
    payload = {
        "image": str(out),
        "host": host_ref.label,
        "device": device_ref.label,
        "family_id": host.family_id,
        "prompt": req.prompt,
        "steps": req.steps,
        "relay_step": req.relay_step,
        "scheduler": req.sampler,
        "guidance": req.guidance_scale,
        "seed": req.seed,
        "host_seconds": round(res.host_seconds, 4),
        "device_seconds": round(res.device_seconds, 4),
        "relay_state_bytes": res.state_bytes,
        "cache_budget": req.cache_budget,
        "load_seconds": round(load_s, 3),
    }
    emit(args.json, payload, [
        f"wrote {out}  ({req.prompt!r}, {req.sampler}, k={req.relay_step}/{req.steps}, seed {req.seed})",
        f"host   {res.host_seconds:8.3f} s   ({host_ref.label})",
        f"device {res.device_seconds:8.3f} s   ({device_ref.label})",
        f"relay state {res.state_bytes} bytes",
    ])
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from PIL import Image

    from relaydiff.core import family
    from relaydiff.core.relay import decode, resume
    from relaydiff.core.state import MAX_STATE_BYTES, RelayState

    path = Path(args.state)
    if not path.is_file():
        raise RelaydiffError(f"relay state file not found: '{path}'")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise RelaydiffError(f"relay state file '{path}' is {path.stat().st_size} bytes; the cap is {MAX_STATE_BYTES}")
    state = RelayState.from_bytes(path.read_bytes())
    if args.cache_budget is not None:
        from dataclasses import replace

        state = replace(state, cache_budget=args.cache_budget)  # validated: B in [1, N - k]
    ref = family.resolve(args.device or family.default_family_dir(), args.device_variant, role="device")
    model = family.load(ref)
    t0 = time.perf_counter()
    try:  # resume runs family.check_state first, the check the runtime and the host fallback run
        final = resume(model, state, progress=not args.json)  # the state was parsed and validated once, above
    except CompatibilityError as exc:  # every mismatched field, both values
        return _refused(args, exc, f"the relay state cannot continue on {ref.label}")
    image = decode(model, final.latents)[0]
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out)
    payload = {"image": str(out), "device": ref.label, "relay_step": state.step_index, "steps": state.num_inference_steps,
               "device_seconds": round(secs, 4), "prompt": state.prompt, "cache_budget": state.cache_budget}
    emit(args.json, payload, [f"wrote {out}  (resumed at step {state.step_index}/{state.num_inference_steps} on {ref.label}, {secs:.3f} s)"])
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from relaydiff.core.diagnose import run_diagnostic, write_outputs

    host_ref, device_ref = resolve_pair(args)
    req = request(args, host_ref)
    host, device = load_pair(host_ref, device_ref)
    diag = run_diagnostic(host, device, req, progress=not args.json)
    paths = write_outputs(diag, Path(args.out_dir))
    payload = {**diag.to_json(), "files": paths}
    emit(args.json, payload, [
        f"max relative deviation of ||x_t|| after the hand-off: {100 * diag.max_deviation_after_handoff:.2f}%",
        f"final latent relative L2 distance relay vs host-only: {diag.final_latent_rel_l2:.4f}",
        "wrote " + ", ".join(paths.values()),
    ])
    return 0


def _refused(args: argparse.Namespace, exc: CompatibilityError, head: str = "cannot relay") -> int:
    """Exit 1 with every mismatched field and both values (one JSON document under --json)."""
    fields = exc.to_json()
    emit(args.json, {"ok": False, "mismatches": fields},
         [f"{head}: {len(fields)} field(s) differ"]
         + [f"  {m['field']}: host {m['host']!r}, device {m['device']!r}" for m in fields])
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the pair can relay; 1 with every mismatched field (both values) when it cannot."""
    from relaydiff.core import family

    try:
        host, device = resolve_pair(args)
    except CompatibilityError as exc:
        return _refused(args, exc)
    payload = {"ok": True, "host": host.label, "device": device.label, "family_id": family.family_id(host),
               "mismatches": []}
    emit(args.json, payload, [f"ok: {host.label} can relay to {device.label} (family {payload['family_id']})"])
    return 0
