"""Quick prompt-accuracy check of a trained family with the classical scorer.

``relaydiff family evaluate DIR [--n 50] [--steps 25] [--guidance 5] [--split val]`` prints host-only,
device-only and relay (host for the first k of the steps) accuracies on one- and two-object prompts of the
validation split (model selection; ``--split test`` for reported figures), with 95% bootstrap CIs, and
for each how often each of the scorer's checks failed (object found, shape, size, position, relation,
background, count): where a family falls short, not only how much.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

PROMPT_SET = 777  # split_prompts seed of this quick check's prompts (validation split by default)


def load_family(root: str | Path, device_subfolder: str = "unet_device") -> dict[str, Any]:
    """Load the shared components and both UNets of a family folder (eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    r = Path(root)
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(str(r / "tokenizer"), local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(str(r / "text_encoder")).eval(),
        "vae": AutoencoderKL.from_pretrained(str(r / "vae")).eval(),
        "host": UNet2DConditionModel.from_pretrained(str(r / "unet")).eval(),
        "device": UNet2DConditionModel.from_pretrained(str(r / device_subfolder)).eval(),
        "scheduler_config": json.loads((r / "scheduler" / "scheduler_config.json").read_text()),
    }


def accuracy(
    fam: dict[str, Any], prompts: Sequence[str], *, mode: str, k: float = 0.3, steps: int = 25,
    guidance: float = 5.0, seed: int = 0, batch: int = 25,
) -> tuple[float, Any]:
    """Share of ``prompts`` whose sample the scorer marks correct, and the images.

    Args:
        mode: "host", "device" or "relay" (host runs the first ``k`` of the steps).
    Raises:
        ValueError: on an unknown ``mode``.
    """
    import numpy as np

    from relaydiff.embedded.sampling import generate
    from relaydiff.scorer import score

    unets = {"host": [fam["host"]], "device": [fam["device"]], "relay": [fam["host"], fam["device"]]}
    if mode not in unets:
        raise ValueError(f"mode must be one of {sorted(unets)}, got {mode!r}")
    imgs = []
    for i in range(0, len(prompts), batch):
        imgs.append(generate(unets[mode], fam["text_encoder"], fam["tokenizer"], fam["vae"],
                             fam["scheduler_config"], prompts[i : i + batch], steps=steps,
                             guidance=guidance, seed=seed + i, switch_fraction=k))
    images = np.concatenate(imgs)
    ok = [score(im, p).correct for im, p in zip(images, prompts)]
    return sum(ok) / len(ok), images


def check_failures(images: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Share of samples failing each scorer check, by check kind (``object1.shape`` counts as ``shape``)."""
    from collections import Counter

    from relaydiff.scorer import score

    failed: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for image, prompt in zip(images, prompts, strict=True):
        for name, ok in score(image, prompt).checks:
            kind = name.rsplit(".", 1)[-1].rstrip("0123456789")
            seen[kind] += 1
            failed[kind] += not ok
    return {k: round(failed[k] / seen[k], 3) for k in sorted(seen)}


# Prompts that differ in one attribute only (position, colour, shape), for text_separation.
SEPARATION_PROMPTS: dict[str, tuple[str, ...]] = {
    "position": ("a large red circle on the left", "a large red circle on the right",
                 "a large red circle at the top", "a large red circle at the bottom"),
    "colour": ("a large red circle on the left", "a large blue circle on the left",
               "a large green circle on the left", "a large yellow circle on the left"),
    "shape": ("a large red circle on the left", "a large red square on the left",
              "a large red triangle on the left", "a large red diamond on the left"),
}


def text_separation(fam: dict[str, Any]) -> dict[str, float]:
    """Mean pairwise L2 distance between the text encoder's hidden states (whole padded sequence) of prompts
    that differ in one attribute: a UNet cannot follow a word its conditioning barely changes with."""
    import torch

    from relaydiff.embedded.sampling import encode_prompts

    out = {}
    with torch.no_grad():
        for name, prompts in SEPARATION_PROMPTS.items():
            e = encode_prompts(fam["tokenizer"], fam["text_encoder"], prompts).reshape(len(prompts), -1)
            d = torch.cdist(e, e)
            n = len(prompts)
            out[name] = round(float(d.sum() / (n * (n - 1))), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print accuracies of a family folder; save a grid PNG per mode when --grid-dir is given."""
    import torch

    from relaydiff.world import noise_seed, split_prompts

    p = argparse.ArgumentParser(prog="relaydiff family evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("family", type=Path, help="family folder")
    p.add_argument("--n", type=int, default=50, help="prompts per object count")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--k", type=float, default=0.3, help="host share of steps in relay mode")
    p.add_argument("--modes", default="host,device,relay", help="comma list of host, device, relay")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--grid-dir", type=Path, default=None, help="write a PNG grid per mode here (default: none)")
    p.add_argument("--device-subfolder", default="unet_device", help="device UNet subfolder")
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="prompts from the validation split (model selection) or the test split")
    p.add_argument("--text", action="store_true", help="also print how far apart the text encoder puts prompts "
                   "that differ only in position, colour or shape")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fam = load_family(args.family, args.device_subfolder)
    separation = text_separation(fam) if args.text else None
    if separation is not None:
        print("text encoder, mean pairwise L2 of prompts differing only in: "
              + ", ".join(f"{k} {v:.2f}" for k, v in separation.items()), flush=True)
    results: dict[str, dict[int, float]] = {}
    failures: dict[str, dict[int, dict[str, float]]] = {}
    for n_obj in (1, 2):
        prompts = split_prompts(args.split, args.n, n_obj, seed=PROMPT_SET)
        for mode in args.modes.split(","):
            acc, images = accuracy(fam, prompts, mode=mode, k=args.k, steps=args.steps,
                                   guidance=args.guidance, seed=noise_seed(args.split, 1000 * n_obj))
            results.setdefault(mode, {})[n_obj] = acc
            failures.setdefault(mode, {})[n_obj] = fails = check_failures(images, prompts)
            from relaydiff.evaluate import bootstrap_ci
            from relaydiff.scorer import score

            lo, hi = bootstrap_ci([score(im, pr).correct for im, pr in zip(images, prompts)])
            print(f"{mode:6s} {n_obj}-object: {acc:.1%} [{lo:.0%}, {hi:.0%}]  failed checks: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in fails.items()), flush=True)
            if args.grid_dir is not None:
                from PIL import Image

                from relaydiff.embedded.sampling import image_grid

                args.grid_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image_grid(images[:32], cols=8, scale=3)).save(
                    args.grid_dir / f"{mode}_{n_obj}obj.png")
    print(json.dumps({"accuracy": results, "failed_checks": failures, "text_separation": separation}))
    return 0
