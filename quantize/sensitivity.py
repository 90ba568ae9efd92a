"""Which modules of the device UNet step does ExecuTorch's W8A8 hurt? Leave one set in float at a time and measure.

    relaydiff quantize sensitivity [--family DIR] [--variant device|student] [--relay-step 8] [--steps 25]
                                   [--probe MODULES]... [--json]

Each probe quantizes the ``unet_step`` with PT2E and the XNNPACK quantizer (:func:`relaydiff.quantize.executorch_int8.quantize_pt2e`,
relay-aware calibration) with the probe's modules left in float, runs the converted module in torch (simulated
INT8: the same quantize/dequantize arithmetic the XNNPACK delegate runs, without the slow lowering), and
measures it on held-out relays with :func:`relaydiff.quantize.parity.relay_parity`: worst denoiser PSNR over
the device steps, its value at the last step, and the relayed image PSNR (worst and mean) against fp32 torch.
The default probes are: nothing float, each child of the UNet, and :data:`DEFAULT_FLOAT_MODULES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def default_probes(root: Any) -> list[tuple[str, ...]]:
    """(), each child module of ``root.unet`` that has parameters, and the default float set."""
    import torch

    from relaydiff.quantize.executorch_int8 import DEFAULT_FLOAT_MODULES

    probes: list[tuple[str, ...]] = [()]
    for name, child in root.unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            probes += [(f"unet.{name}.{i}",) for i in range(len(child))]
        elif any(True for _ in child.parameters()):
            probes.append((f"unet.{name}",))
    return probes + [DEFAULT_FLOAT_MODULES]


def probe(family_dir: Path | None = None, variant: str | None = None, relay_step: int = 8, steps: int = 25,
          probes: Sequence[Sequence[str]] | None = None, calibration_prompts: int = 4, eval_prompts: int = 3,
          progress: bool = True) -> dict[str, Any]:
    """Run every probe; returns rows of figures (one per probe, in order)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from relaydiff.core import family
    from relaydiff.core.metrics import psnr_db
    from relaydiff.export.base import torch_reference
    from relaydiff.export.components import component_for
    from relaydiff.quantize.calibration import CalibrationConfig, capture
    from relaydiff.quantize.executorch_int8 import ExecuTorchInt8Config, _args, quantize_pt2e, resolve_module_paths
    from relaydiff.quantize.parity import eval_config, relay_parity

    torch.set_num_threads(1)
    root_dir = family_dir or family.default_family_dir()
    host = family.load(family.resolve(root_dir, role="host"))
    device = family.load(family.resolve(root_dir, variant, role="device"), share_with=host)
    comp = component_for("unet_step", device)
    sig = comp.signature(device)
    root = comp.module(device)
    total = sum(p.numel() for p in root.parameters())
    cal = capture(host, device, CalibrationConfig(relay_steps=(relay_step,), steps=steps, prompts=calibration_prompts))
    held = eval_config(relay_step, steps, prompts=eval_prompts)
    recorded = capture(host, device, held).for_component("unet_step")
    refs = [torch_reference(root, x, sig)["noise_pred"] for x in recorded]
    rows = []
    for modules in tqdm(list(probes if probes is not None else default_probes(root)), desc="probes", disable=not progress):
        kept = resolve_module_paths(root, modules)
        quantized = quantize_pt2e(comp, device, cal.for_component("unet_step"), ExecuTorchInt8Config(float_modules=tuple(modules)))

        def run(inputs: Any, q: Any = quantized) -> dict[str, np.ndarray]:
            with torch.no_grad():
                return {"noise_pred": q(*_args(sig, inputs)).numpy()}

        per_step: dict[int, float] = {}
        for x, ref in zip(recorded, refs, strict=True):
            t = int(np.asarray(x["timestep"]).reshape(-1)[0])
            per_step[t] = min(per_step.get(t, float("inf")), psnr_db(run(x)["noise_pred"], ref))
        figures = relay_parity(host, device, run, config=held)
        rows.append({
            "float": list(kept), "float_parameter_share": round(sum(p.numel() for n in kept for p in root.get_submodule(n).parameters()) / total, 4),
            "denoiser_psnr_db": round(min(per_step.values()), 2), "last_step_psnr_db": round(per_step[min(per_step)], 2),
            "image_psnr_db": round(figures.image_psnr_db, 2), "image_psnr_db_mean": round(figures.image_psnr_db_mean, 2),
        })
    return {"family": str(root_dir), "variant": variant or "device", "relay_step": relay_step, "steps": steps,
            "calibration_prompts": calibration_prompts, "eval_prompts": eval_prompts, "rows": rows}
