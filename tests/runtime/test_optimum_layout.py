"""bundle build --layout optimum (issue 20 item 5): optimum's ORTStableDiffusionPipeline loads the bundle's optimum/ folder
and generates the image relaydiff's own ONNX device-only generation makes from the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

STEPS = 10
# Both run the same weights in fp32 through onnxruntime, but as different graphs (relaydiff: CFG and the VAE scaling
# inside; optimum: a batch-2 UNet, the pipeline combining the guidance and scaling), so float rounding differs by ~1e-6
# per call and grows a little over 10 DDIM steps; the images are compared after both are rounded to uint8.
MAX_ABS_U8 = 2  # of 255, per pixel
MEAN_ABS_U8 = 0.5


@pytest.fixture(scope="module")
def optimum_bundle(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from relaydiff.export.bundle import BundleConfig, build

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("optimum-bundle") / "bundle"
    build(BundleConfig(family=tiny_family, out=out, targets=("onnx",), precisions=("fp32",), calibration_prompts=2,
                       eval_prompts=1, zip=False, layout="optimum", relay_step=3, steps=STEPS), progress=False)
    return out


def test_optimum_loads_the_layout_and_matches_relaydiff(optimum_bundle: Path) -> None:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from relaydiff.core.relay import RelayRequest
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.bundle import verify
    from relaydiff.runtime.device import DeviceRuntime

    report = verify(optimum_bundle, parity=False)
    assert report.ok, report.problems  # the optimum/ files are listed and hashed
    assert report.manifest is not None and report.manifest.optimum_layout is not None
    files = {e.file for e in report.manifest.optimum_layout.files}
    assert {"optimum/model_index.json", "optimum/unet/model.onnx", "optimum/text_encoder/model.onnx",
            "optimum/vae_decoder/model.onnx", "optimum/scheduler/scheduler_config.json"} <= files

    pipe = ORTStableDiffusionPipeline.from_pretrained(str(optimum_bundle / "optimum"), export=False)
    prompt, seed = "a red circle above a blue square", 4
    got = pipe(prompt, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np").images[0]
    theirs = (np.clip(got, 0, 1) * 255).round().astype(np.uint8)
    ours = DeviceRuntime(create_backend("onnx", bundle_dir=optimum_bundle)).generate(
        RelayRequest(prompt, relay_step=0, steps=STEPS, guidance_scale=5.0, seed=seed)).image
    assert theirs.shape == ours.shape
    diff = np.abs(theirs.astype(int) - ours.astype(int))
    assert diff.max() <= MAX_ABS_U8 and diff.mean() <= MEAN_ABS_U8, (diff.max(), diff.mean())
    other = pipe(prompt, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed + 1),
                 output_type="np").images[0]
    assert np.abs((np.clip(other, 0, 1) * 255).round() - ours).max() > MAX_ABS_U8  # the comparison can fail: another seed differs
