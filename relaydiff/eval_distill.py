"""``relaydiff eval distill``: distilled device students against the undistilled device half, on the same relays.

For every prompt (``relaydiff.evaluate.eval_prompts``, seed i) the host runs steps [0, k) once; from that one
hand-off each device half finishes the trajectory:

- ``host-only``: the host itself finishes [k, N) (the reference of PSNR/SSIM);
- ``teacher``: the undistilled device UNet, N - k guided DDIM steps (2 (N - k) UNet passes);
- ``teacher, M jumps``: the same undistilled UNet on the student's M jumps, still with CFG (2 M passes):
  what the few-step schedule alone gives, without distillation;
- each student variant: M jumps, one conditional pass each.

Reported per row: prompt accuracy (overall and by object count), attribute accuracy, PSNR/SSIM against
host-only, UNet passes and device seconds per image; a grid of images (rows prompts, columns device halves).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError


@dataclass(frozen=True)
class DistillEvalConfig:
    """One comparison."""

    variants: tuple[str, ...] = ("student",)  # student variants of the family (same k and N)
    prompts: int = 200  # eval_prompts(prompts, seed): even over 1-3 objects
    seed: int = 0
    grid_rows: int = 8

    def __post_init__(self) -> None:
        if not self.variants:
            raise RelaydiffError("no student variant given; expected one or more, e.g. student")
        if isinstance(self.prompts, bool) or not isinstance(self.prompts, int) or self.prompts < 1:
            raise RelaydiffError(f"prompts must be a positive integer, got {self.prompts!r}")


class _GuidedTeacher:
    """The teacher UNet as a student-like Denoiser (one call per jump on the conditional embeddings) that runs CFG
    inside, as the exported ``unet_step`` module does: eps_u + g (eps_c - eps_u)."""

    def __init__(self, teacher: Any, uncond: Any, guidance_scale: float) -> None:
        import torch

        from relaydiff.core.denoiser import unet_denoiser
        from relaydiff.export.modules import UNetStep

        plain = unet_denoiser(teacher)
        self.latent_spec, self.text_embed_dim = plain.latent_spec, plain.text_embed_dim
        self.step, self.uncond, self.g = UNetStep(teacher.unet), uncond, torch.tensor([guidance_scale])

    def __call__(self, latent: Any, timestep: Any, conditioning: Any) -> Any:
        import torch

        return self.step(latent, timestep, torch.cat([self.uncond, conditioning.text_embeds]), self.g)


def run_distill_eval(family_dir: Path, cfg: DistillEvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the comparison; returns the report (summary rows, per-prompt rows) and the grid images."""
    import torch
    from tqdm.auto import tqdm

    from relaydiff.core import family
    from relaydiff.core.relay import RelayRequest, decode, resume, snapshots
    from relaydiff.core.student import student_finish
    from relaydiff.evaluate import eval_prompts, psnr, ssim
    from relaydiff.scorer import score
    from relaydiff.world import parse_prompt

    host = family.load(family.resolve(family_dir, None, role="host"))
    teacher = family.load(family.resolve(family_dir, None, role="device"), share_with=host)
    if teacher.student is not None:
        raise RelaydiffError(f"the default device variant of {family_dir} is a student; the teacher must be undistilled")
    students = {v: family.load(family.resolve(family_dir, v, role="device"), share_with=host) for v in cfg.variants}
    for v, s in students.items():
        if s.student is None:
            raise RelaydiffError(f"device variant {v!r} of {family_dir} is not a distilled student (no relaydiff_student.json)")
    specs = {v: s.student for v, s in students.items() if s.student is not None}
    grids = {(s.relay_step, s.steps, s.student_steps, s.guidance_scale) for s in specs.values()}
    if len(grids) != 1:
        raise RelaydiffError(f"the students were distilled for different (k, N, M, guidance): {sorted(grids)}")
    k, n, m, g = grids.pop()
    few = replace(next(iter(specs.values())), parametrization="eps", timestep_scaling=None, sigma_data=None)  # the teacher on M jumps
    halves = ["host-only", "teacher", f"teacher, {m} jumps", *cfg.variants]
    passes = {"host-only": 2 * (n - k), "teacher": 2 * (n - k), f"teacher, {m} jumps": 2 * m, **{v: m for v in cfg.variants}}
    prompts = eval_prompts(cfg.prompts, cfg.seed)
    shown = {int(v) for v in np.linspace(0, len(prompts) - 1, min(cfg.grid_rows, len(prompts))).round()}
    rows: list[dict[str, Any]] = []
    grid: list[list[np.ndarray]] = []
    for i, prompt in enumerate(tqdm(prompts, desc="eval distill", disable=not progress)):
        spec = parse_prompt(prompt)
        state, _ = snapshots(host, RelayRequest(prompt, relay_step=k, steps=n, guidance_scale=g, seed=cfg.seed + i), [k])[k]
        images: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for half in halves:
            t0 = time.perf_counter()
            with torch.inference_mode():
                if half == "host-only":
                    latents = resume(host, state).latents
                elif half == "teacher":
                    latents = resume(teacher, state).latents
                elif half in students:
                    latents = resume(students[half], state).latents
                else:
                    if state.negative_prompt_embeds is None:
                        raise RelaydiffError(f"the students were distilled with guidance {g}, but the host state carries no unconditional embeddings")
                    guided = _GuidedTeacher(teacher, state.negative_prompt_embeds.float(), g)
                    latents = student_finish(guided, few, state.latents, state.timesteps, k, state.prompt_embeds.float(),
                                             teacher.scheduler_config, state.sampler)
            seconds[half] = time.perf_counter() - t0
            images[half] = decode(teacher, latents)[0]
        for half in halves:
            result = score(images[half], prompt)
            rows.append({"prompt": prompt, "seed": cfg.seed + i, "n_objects": spec.n_objects, "half": half,
                         "correct": bool(result.correct), "attribute_accuracy": float(result.attribute_accuracy),
                         "psnr": None if half == "host-only" else float(psnr(images[half], images["host-only"])),
                         "ssim": float(ssim(images[half], images["host-only"])), "device_seconds": seconds[half]})
        if i in shown:
            grid.append([images[h] for h in halves])
    summary = []
    for half in halves:
        rs = [r for r in rows if r["half"] == half]
        entry: dict[str, Any] = {
            "half": half, "unet_passes": passes[half], "prompts": len(rs),
            "accuracy": float(np.mean([r["correct"] for r in rs])),
            "attribute_accuracy": float(np.mean([r["attribute_accuracy"] for r in rs])),
            "psnr_vs_host_db": None if half == "host-only" else float(np.mean([r["psnr"] for r in rs if np.isfinite(r["psnr"])])),
            "ssim_vs_host": float(np.mean([r["ssim"] for r in rs])),
            "device_seconds": float(np.median([r["device_seconds"] for r in rs])),
        }
        for j in sorted({r["n_objects"] for r in rs}):
            entry[f"accuracy_{j}obj"] = float(np.mean([r["correct"] for r in rs if r["n_objects"] == j]))
        if half in students:
            training = specs[half].training or {}
            entry["method"] = specs[half].method or "progressive"
            entry["training"] = {key: training.get(key) for key in ("updates", "trajectories", "wall_s")}
        summary.append(entry)
    return {"config": {**asdict(cfg), "family": str(family_dir), "relay_step": k, "steps": n, "student_steps": m, "guidance_scale": g},
            "halves": halves, "summary": summary, "rows": rows, "grid": grid}


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write report.json (no images) and grid.png (rows prompts, columns device halves) into ``out_dir``."""
    import json

    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {key: v for key, v in report.items() if key != "grid"}
    (out_dir / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    paths = {"report": str(out_dir / "report.json")}
    if report["grid"]:
        scale, pad, head = 4, 4, 14
        h, w = report["grid"][0][0].shape[:2]
        cols = len(report["grid"][0])
        cw = max(w * scale, 120)
        canvas = Image.new("RGB", (cols * (cw + pad) + pad, head + len(report["grid"]) * (h * scale + pad) + pad), "white")
        draw = ImageDraw.Draw(canvas)
        for c, name in enumerate(report["halves"]):
            draw.text((pad + c * (cw + pad), 2), name, fill="black")
        for r, row in enumerate(report["grid"]):
            for c, img in enumerate(row):
                tile = Image.fromarray(img).resize((w * scale, h * scale), Image.Resampling.NEAREST)
                canvas.paste(tile, (pad + c * (cw + pad), head + pad + r * (h * scale + pad)))
        canvas.save(out_dir / "grid.png")
        paths["grid"] = str(out_dir / "grid.png")
    return paths


def format_table(report: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    lines = [f"{'device half':<22} {'passes':>6} {'prompt acc':>10} {'1-obj':>6} {'attr acc':>8} {'PSNR dB':>8} {'SSIM':>6} {'device s':>9}"]
    for e in report["summary"]:
        p = "-" if e["psnr_vs_host_db"] is None else f"{e['psnr_vs_host_db']:.2f}"
        lines.append(f"{e['half']:<22} {e['unet_passes']:>6} {100 * e['accuracy']:>9.1f}% {100 * e.get('accuracy_1obj', 0.0):>5.1f}% "
                     f"{e['attribute_accuracy']:>8.3f} {p:>8} {e['ssim_vs_host']:>6.3f} {e['device_seconds']:>9.4f}")
    return "\n".join(lines)
