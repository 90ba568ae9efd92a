"""Diagnostic probes of a family: where the device departs from the host, and what caps both.

``relaydiff family probe FAMILY PROBE [--n N]`` with PROBE one of
- ``vae``: the scorer on VAE round trips of exact renders (validation split): what any UNet is capped at;
- ``denoise``: each UNet's noise-prediction error against the true noise, by timestep, on noised latents of
  validation renders (which model is better where: a capacity / training question);
- ``swap``: along the host's own guided trajectories (validation prompts), the device's guided noise prediction
  against the host's at every step (relative squared error, ``gap_by_step``), and the accuracy, PSNR to the
  host image and per-check failures when the device replaces the host at one step only (``single``) or
  finishes from step k (``relay``), each with its paired difference to host-only.

Every probe prints one JSON object (figures for ``docs/family.md``). Prompts come from the validation split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

PROBE_SPLIT = "val"


def val_prompts(n: int, n_objects: Sequence[int] = (1, 2)) -> list[str]:
    """``n`` validation prompts spread evenly over ``n_objects``."""
    from relaydiff.world import split_prompts

    per = [n // len(n_objects) + (i < n % len(n_objects)) for i in range(len(n_objects))]
    return [p for m, c in zip(n_objects, per) for p in split_prompts(PROBE_SPLIT, c, m, seed=7)]


def _scores(images: Any, prompts: Sequence[str]) -> dict[str, Any]:
    from relaydiff.evaluate import bootstrap_ci, failure_rates
    from relaydiff.scorer import score

    res = [score(im, p) for im, p in zip(images, prompts, strict=True)]
    ok = [r.correct for r in res]
    return {"accuracy": sum(ok) / len(ok), "ci95": bootstrap_ci(ok), "n": len(ok),
            "failed_checks": failure_rates([list(r.checks) for r in res]), "correct": ok}


def vae_roundtrip(fam: dict[str, Any], n_per_count: int = 100, size: int = 32) -> dict[str, Any]:
    """Scorer accuracy of exact renders and of their VAE round trips (posterior mode), by object count."""
    import numpy as np
    import torch

    from relaydiff.world import make_batch

    vae = fam["vae"]
    out: dict[str, Any] = {}
    for m in (1, 2, 3):
        images, caps, _ = make_batch(9000 + m, n_per_count, size=size, n_objects=m, split=PROBE_SPLIT)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        rec_u8 = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        exact, rt = _scores(images, caps), _scores(rec_u8, caps)
        out[f"{m}obj"] = {"exact": exact["accuracy"], "roundtrip": rt["accuracy"], "roundtrip_ci95": rt["ci95"],
                          "roundtrip_failed_checks": rt["failed_checks"],
                          "mse": float((rec - x).pow(2).mean())}
    return out


def denoise_error(fam: dict[str, Any], n: int = 96, timesteps: Sequence[int] = (50, 150, 300, 450, 600, 750, 900),
                  unets: Sequence[str] = ("host", "device")) -> dict[str, Any]:
    """Mean squared error of each UNet's (conditional) noise prediction to the true noise, by timestep."""
    import numpy as np
    import torch

    from relaydiff.embedded.models import build_scheduler
    from relaydiff.embedded.sampling import encode_prompts
    from relaydiff.world import make_batch

    sched = build_scheduler()
    vae, sf = fam["vae"], fam["vae"].config.scaling_factor
    images, caps, _ = make_batch(9100, n, n_objects=None, split=PROBE_SPLIT)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {name: {} for name in unets}
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mode() * sf
        ctx = encode_prompts(fam["tokenizer"], fam["text_encoder"], caps)
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=g)
            tt = torch.full((n,), t)
            zt = sched.add_noise(z0, noise, tt)  # type: ignore[arg-type]  # diffusers annotates timesteps as IntTensor
            for name in unets:
                eps = fam[name](zt, tt, encoder_hidden_states=ctx).sample
                out[name][str(t)] = round(float((eps - noise).pow(2).mean()), 5)
    return out


def _guided(unet: Any, z: Any, t: Any, ctx: Any, guidance: float) -> Any:
    eps_u, eps_c = unet(z.repeat(2, 1, 1, 1), t, encoder_hidden_states=ctx).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def trajectories(
    fam: dict[str, Any], prompts: Sequence[str], *, plan: Sequence[str], steps: int = 25, guidance: float = 5.0,
    seed: int = 0, record_gap: bool = False,
) -> tuple[Any, list[float]]:
    """Run DDIM where step i uses UNet ``plan[i]`` ("host" or "device"); return decoded images and, with
    ``record_gap``, the device-vs-host relative squared error of the guided prediction at each step's state."""
    import torch
    from diffusers import DDIMScheduler

    from relaydiff.embedded.sampling import encode_prompts

    if len(plan) != steps:
        raise ValueError(f"plan needs one entry per step ({steps}), got {len(plan)}")
    sched = DDIMScheduler.from_config(fam["scheduler_config"])
    sched.set_timesteps(steps)
    n = len(prompts)
    host = fam["host"]
    gen = torch.Generator().manual_seed(seed)
    gaps: list[float] = []
    with torch.no_grad():
        ctx = torch.cat([encode_prompts(fam["tokenizer"], fam["text_encoder"], [""] * n),
                         encode_prompts(fam["tokenizer"], fam["text_encoder"], prompts)])
        z = torch.randn(n, host.config.in_channels, host.config.sample_size, host.config.sample_size, generator=gen)
        for i, t in enumerate(sched.timesteps):
            eps = _guided(fam[plan[i]], z, t, ctx, guidance)
            if record_gap:
                other = _guided(fam["device" if plan[i] == "host" else "host"], z, t, ctx, guidance)
                ref, dev = (eps, other) if plan[i] == "host" else (other, eps)
                gaps.append(float((dev - ref).pow(2).sum() / ref.pow(2).sum()))
            z = sched.step(eps, t, z).prev_sample
        img = fam["vae"].decode(z / fam["vae"].config.scaling_factor).sample
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return img, gaps


def swap_probe(fam: dict[str, Any], prompts: Sequence[str], *, steps: int = 25, guidance: float = 5.0,
               single: Sequence[int] = (0, 3, 6, 9, 12, 15, 18, 21, 24), relay: Sequence[int] = (0, 8, 15, 20, 23, 25),
               ) -> dict[str, Any]:
    """Accuracy (and PSNR to host-only) when the device runs step ``i`` only, or steps ``k..N-1`` (relay)."""
    import numpy as np

    from relaydiff.evaluate import paired_diff_ci, psnr

    host_img, gaps = trajectories(fam, prompts, plan=["host"] * steps, steps=steps, guidance=guidance,
                                  record_gap=True)
    base = _scores(host_img, prompts)
    out: dict[str, Any] = {"host": {k: v for k, v in base.items() if k != "correct"},
                           "gap_by_step": [round(g, 4) for g in gaps], "single": {}, "relay": {}}

    def entry(img: Any) -> dict[str, Any]:
        s = _scores(img, prompts)
        d = paired_diff_ci(s["correct"], base["correct"])
        changed = float(np.mean([a != b for a, b in zip(s["correct"], base["correct"])]))
        return {"accuracy": s["accuracy"], "minus_host": d, "changed_verdicts": changed,
                "psnr_to_host": float(np.mean([min(psnr(a, b), 60.0) for a, b in zip(img, host_img)])),
                "failed_checks": s["failed_checks"]}

    for i in single:
        plan = ["host"] * steps
        plan[i] = "device"
        out["single"][str(i)] = entry(trajectories(fam, prompts, plan=plan, steps=steps, guidance=guidance)[0])
    for k in relay:
        plan = ["host"] * k + ["device"] * (steps - k)
        out["relay"][str(k)] = entry(trajectories(fam, prompts, plan=plan, steps=steps, guidance=guidance)[0])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one probe on a family folder and print its JSON."""
    import torch

    from relaydiff.embedded.evaluate import load_family

    p = argparse.ArgumentParser(prog="relaydiff family probe", description=__doc__.splitlines()[0])
    p.add_argument("family", type=Path)
    p.add_argument("probe", choices=("vae", "denoise", "swap"))
    p.add_argument("--n", type=int, default=60, help="prompts (swap), renders (denoise) or renders per object count (vae)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device-subfolder", default="unet_device")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n!r}")
    torch.set_num_threads(args.threads)
    if args.probe == "vae":  # the VAE alone: also works on a family whose UNet stages have not run yet
        from diffusers import AutoencoderKL

        result = vae_roundtrip({"vae": AutoencoderKL.from_pretrained(str(args.family / "vae")).eval()}, args.n)
        print(json.dumps(result, default=float))
        return 0
    fam = load_family(args.family, args.device_subfolder)
    if args.probe == "denoise":
        result = denoise_error(fam, args.n)
    else:
        result = swap_probe(fam, val_prompts(args.n))
    print(json.dumps(result, default=float))
    return 0

