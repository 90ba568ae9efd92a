"""(a) Per call: each runnable file (.onnx, .ort, .pte) against the torch fp32 component on inputs from real relays.

fp32 artifacts: max abs error <= 1e-3 on every input (the exporters' fp32 bar). INT8 artifacts: the bar
their manifest entry declares (PSNR in dB, held on relay-drawn inputs as in docs/bundle.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from relaydiff.runtime.gates import FP32_MAX_ABS  # the bar bundle build gates on: one definition


@pytest.mark.artifacts(target=("onnx", "executorch"), component=("unet_step", "vae_decoder"))
def test_artifact_matches_torch_per_call(
    entry: dict[str, Any], pair: tuple[Any, Any], samples: dict[str, list[dict[str, Any]]], open_file: Callable[..., Any]
) -> None:
    from relaydiff.core.metrics import psnr_db
    from relaydiff.runtime.manifest import ArtifactEntry
    from relaydiff.export.components import component_for

    device = pair[1]
    comp = component_for(entry["component"], pair[1])
    inputs = samples[entry["component"]]
    refs = [comp.reference(device, x) for x in inputs]
    tol = entry["tolerance"]
    problems, figures = [], []
    for file in ArtifactEntry.from_json(entry).runnable_files():
        session = open_file(entry, file)
        for i, (x, ref) in enumerate(zip(inputs, refs, strict=True)):
            got = session(x)
            for name, want in ref.items():
                y = np.asarray(got[name])
                if y.shape != want.shape or not np.isfinite(y).all():
                    problems.append(f"{file} input {i} {name}: shape {y.shape} (want {want.shape}), finite={np.isfinite(y).all()}")
                    continue
                err, p = float(np.abs(y.astype(np.float64) - want).max()), psnr_db(y, want)
                figures.append((file, i, err, p))
                if entry["precision"] == "fp32" and err > FP32_MAX_ABS:
                    problems.append(f"{file} input {i} {name}: max abs error {err:.3g} > {FP32_MAX_ABS:g}")
                if entry["precision"] != "fp32" and tol.get("min_psnr_db") is not None and p < tol["min_psnr_db"]:
                    problems.append(f"{file} input {i} {name}: PSNR {p:.2f} dB < {tol['min_psnr_db']} dB")
                if entry["precision"] != "fp32" and tol.get("max_abs") is not None and err > tol["max_abs"]:
                    problems.append(f"{file} input {i} {name}: max abs error {err:.3g} > {tol['max_abs']:g}")
    assert figures and not problems, "\n".join(problems)
