"""``relaydiff eval preview``: editing sessions from the world grammar under each policy (issue 18, item 5).

Policies, per session of 3-6 rounds whose final prompt is a test caption:

- ``host_every_round``: the host generates every round from noise (N steps);
- ``device_only``: the device runs the full N-step schedule every round; its last image is the result;
- ``preview_host_noise``: device previews, then the host generates the final prompt from noise;
- ``preview_refine_<s>``: device previews, then the host refines the last preview at fixed s;
- ``preview_refine_predictor``: device previews, then the host refines at the predicted strength.

The preview policies share one sequence of device previews per session. Compute is counted in UNet
evaluations (a CFG step is two) and FLOPs (the family's ``flops_per_step``). Accuracy is the scorer's
prompt accuracy of the final image, with a percentile bootstrap CI over sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from relaydiff.core.refine import refine
from relaydiff.core.relay import decode, encode_prompt, relay_side
from relaydiff.preview.session import EditConfig, EditSession, LocalRefiner, cfg_calls, contact_sheet

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel
    from relaydiff.preview.predictor import StrengthPredictors

FIXED = (0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class PreviewEvalConfig:
    """What ``eval preview`` runs."""

    sessions: int = 12  # editing sessions (final prompts from the split)
    split: str = "test"  # "test" for reported figures, "val" for selection
    seed: int = 0  # session-drawing seed
    edit: EditConfig = EditConfig()  # schedules, sampler, guidance, the reuse strength (None: predictor)
    bootstrap: int = 1000  # bootstrap resamples of the CIs


def bootstrap_ci(values: list[float], n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _flops(model: LoadedModel) -> float:
    from relaydiff.core.family import family_info

    info = family_info(model.ref.root) or {}
    per = info.get("training", {}).get("flops_per_step", {})
    value = per.get(model.ref.unet_subfolder)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def run_preview_eval(host: LoadedModel, device: LoadedModel, config: PreviewEvalConfig,
                     predictors: StrengthPredictors | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run every policy on ``config.sessions`` sessions; returns the report (per-policy figures and per-session rows)."""
    from tqdm.auto import tqdm

    from relaydiff.evaluate import eval_noise_seed
    from relaydiff.preview.edits import sessions as make_sessions
    from relaydiff.scorer import score

    g = config.edit.guidance_scale
    hs, ds = relay_side(host), relay_side(device)
    policies = ["host_every_round", "device_only", "preview_host_noise", *[f"preview_refine_{s}" for s in FIXED]]
    if predictors is not None:
        policies.append("preview_refine_predictor")
    rows: list[dict[str, Any]] = []
    sheet_images: list[np.ndarray] = []
    sheet_labels: list[str] = []
    for i, rounds in enumerate(tqdm(make_sessions(config.split, config.sessions, seed=config.seed), desc="sessions",
                                    disable=not progress)):
        final_prompt = rounds[-1]
        # session i draws its noise as test (val) prompt i of `eval relay` does: seeds no training run uses
        c = replace(config.edit, seed=eval_noise_seed(config.split, config.seed, i))
        row: dict[str, Any] = {"rounds": rounds, "policies": {}, "noise_seed": c.seed}
        he = encode_prompt(host, final_prompt)
        kw: dict[str, Any] = {"sampler": c.sampler, "guidance_scale": g, "seed": c.seed}
        # host every round: N host steps per round, the last one is the result
        host_img = decode(host, refine(hs, None, he, strength=1.0, steps=c.steps, **kw).latents)[0]
        row["policies"]["host_every_round"] = (host_img, cfg_calls(c.steps, g) * len(rounds), 0)
        dev_img = decode(device, refine(ds, None, encode_prompt(device, final_prompt), strength=1.0, steps=c.steps,
                                        **kw).latents)[0]
        row["policies"]["device_only"] = (dev_img, 0, cfg_calls(c.steps, g) * len(rounds))
        session = EditSession(device, c, predictors=predictors)
        for p in rounds:
            session.preview(p)
        last = session.last
        assert last is not None
        device_calls = sum(r.device_calls for r in session.rounds)
        row["policies"]["preview_host_noise"] = (host_img, cfg_calls(c.steps, g), device_calls)
        for s in FIXED:
            if s == 1.0:  # refining at s = 1 is generating from the same noise, bit for bit (core.refine, tested)
                row["policies"]["preview_refine_1.0"] = (host_img, cfg_calls(c.steps, g), device_calls)
                continue
            reply = LocalRefiner(host)(last.latents, final_prompt, s, c)
            row["policies"][f"preview_refine_{s}"] = (reply.image, reply.calls, device_calls)
        if predictors is not None:
            reply = LocalRefiner(host, predictors, device=device)(last.latents, final_prompt, None, c)
            row["policies"]["preview_refine_predictor"] = (reply.image, reply.calls, device_calls + 1)
            row["predicted_strength"] = reply.strength
        row["preview_calls_per_round"] = device_calls / len(rounds)
        for name in policies:
            img, hc, dc = row["policies"][name]
            row["policies"][name] = {"correct": bool(score(img, final_prompt).correct), "host_unet_evals": hc,
                                     "device_unet_evals": dc}
            if i < 3:
                sheet_images.append(img)
                sheet_labels.append(name.replace("preview_refine_", "r").replace("_", "")[:8])
        if i < 3:
            sheet_images += [r.image for r in session.rounds]
            sheet_labels += [f"p{r.index + 1}" for r in session.rounds]
        rows.append(row)
    hf, df = _flops(host), _flops(device)
    summary: dict[str, Any] = {}
    for name in policies:
        acc = [float(r["policies"][name]["correct"]) for r in rows]
        hc = float(np.mean([r["policies"][name]["host_unet_evals"] for r in rows]))
        dc = float(np.mean([r["policies"][name]["device_unet_evals"] for r in rows]))
        summary[name] = {"prompt_accuracy": float(np.mean(acc)), "ci95": bootstrap_ci(acc, config.bootstrap),
                         "host_unet_evals_per_session": hc, "device_unet_evals_per_session": dc,
                         "host_gflops_per_session": hc * hf / 1e9, "device_gflops_per_session": dc * df / 1e9}
    base = summary["host_every_round"]["host_unet_evals_per_session"]
    noise = summary["preview_host_noise"]["host_unet_evals_per_session"]
    for name in policies:
        h = summary[name]["host_unet_evals_per_session"]
        summary[name]["host_saving_vs_every_round"] = 1 - h / base if base else None
        summary[name]["host_saving_vs_preview_host_noise"] = 1 - h / noise if noise else None
        diff = [float(r["policies"][name]["correct"]) - float(r["policies"]["preview_host_noise"]["correct"]) for r in rows]
        summary[name]["accuracy_minus_preview_host_noise_ci95"] = bootstrap_ci(diff, config.bootstrap, seed=1)
    preview_calls = float(np.mean([r["preview_calls_per_round"] for r in rows]))
    report = {
        "split": config.split, "sessions": len(rows), "steps": config.edit.steps, "preview_steps": config.edit.preview_steps,
        "sampler": config.edit.sampler, "guidance_scale": g, "reuse_strength": config.edit.reuse_strength,
        "policies": summary,
        "preview_device_evals_per_round": preview_calls,
        "device_only_evals_per_round": cfg_calls(config.edit.steps, g),
        "preview_over_device_only": preview_calls / cfg_calls(config.edit.steps, g),
        "rows": [{"rounds": r["rounds"], "noise_seed": r["noise_seed"], "predicted_strength": r.get("predicted_strength"), "policies": r["policies"]}
                 for r in rows],
    }
    report["_sheet"] = (sheet_images, sheet_labels)
    return report


def write_report(report: dict[str, Any], out: Path) -> dict[str, str]:
    """report.json and contact_sheet.png (the first sessions' policies and previews) in ``out``."""
    import json

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    images, labels = report.pop("_sheet")
    paths = {"report": str(out / "report.json"), "contact_sheet": str(out / "contact_sheet.png")}
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    if images:
        Image.fromarray(contact_sheet(images, labels, scale=3)).save(out / "contact_sheet.png")
    return paths
