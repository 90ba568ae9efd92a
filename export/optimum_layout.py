"""``bundle build --layout optimum``: the device model's ONNX graphs in the folder layout optimum's
``ORTStableDiffusionPipeline.from_pretrained`` loads (optimum-onnx; read from its ``modeling_diffusion.py``).

The layout (``<bundle>/optimum/``)::

    model_index.json                     StableDiffusionPipeline, DDIMScheduler, CLIPTokenizer; no safety checker
    scheduler/scheduler_config.json      the bundle's DDIM schedule (the same config the device loop uses)
    tokenizer/                           the family's tokenizer files
    text_encoder/model.onnx, config.json input_ids (1, L) int32 -> last_hidden_state (1, L, D)
    unet/model.onnx, config.json         sample (2, C, h, w), timestep () float32, encoder_hidden_states (2, L, D) -> out_sample
    vae_decoder/model.onnx, config.json  latent_sample (1, C, h, w) (already divided by scaling_factor) -> sample in [-1, 1]

These are optimum's conventions, not relaydiff's: the pipeline batches CFG as [uncond, cond] and combines the guidance
itself, divides the latent by the VAE scaling factor and post-processes the image. The graphs are fixed-shape like every
bundle artifact: one image per prompt with classifier-free guidance (guidance_scale > 1) at the family's size. No
vae_encoder (text-to-image does not use it). The files are listed (sha256) in the manifest's ``optimum_layout``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.export.base import ExportError

FOLDER = "optimum"
OPSET = 18


def _wrappers(device: Any) -> dict[str, tuple[Any, tuple[Any, ...], list[str], list[str]]]:
    """name -> (module, example args, input names, output names) in optimum's naming."""
    import torch

    from relaydiff.export.components import family_dims

    class Unet(torch.nn.Module):
        def __init__(self, unet: Any) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder: Any) -> None:
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.text_encoder(input_ids=input_ids, return_dict=False)[0]

    d = family_dims(device)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, d["C"], d["h"], d["w"], generator=g)
    return {
        "text_encoder": (TextEncoder(device.text_encoder).eval(), (torch.zeros(1, d["L"], dtype=torch.int32),),
                         ["input_ids"], ["last_hidden_state"]),
        "unet": (Unet(device.unet).eval(), (latent, torch.tensor(500.0), torch.randn(2, d["L"], d["D"], generator=g)),
                 ["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        "vae_decoder": (VaeDecoder(device.vae).eval(), (latent[:1],), ["latent_sample"], ["sample"]),
    }


def write_layout(device: Any, family_root: Path, scheduler_config: dict[str, Any], out: Path) -> list[Path]:
    """Write ``out/optimum/`` (see the module doc) and return its files.

    Raises:
        ExportError: a graph failed to export or does not match torch (max abs error > 1e-3 on its example input).
    """
    import onnxruntime as ort
    import torch

    from relaydiff.export.bundle import TOKENIZER_FILES
    from relaydiff.export.onnx import strip_node_metadata

    root = out / FOLDER
    root.mkdir(parents=True)
    configs = {"text_encoder": family_root / "text_encoder" / "config.json",
               "unet": family_root / device.ref.unet_subfolder / "config.json",
               "vae_decoder": family_root / "vae" / "config.json"}
    for name, (module, args, ins, outs) in _wrappers(device).items():
        folder = root / name
        folder.mkdir()
        path = folder / "model.onnx"
        try:
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, input_names=ins, output_names=outs,
                              opset_version=OPSET, optimize=True)
        except Exception as exc:  # the exporter raises many types; keep its message
            raise ExportError(f"optimum layout: torch.onnx.export of {name!r} failed: {type(exc).__name__}: {exc}") from exc
        import onnx

        proto = onnx.load(str(path))
        strip_node_metadata(proto)
        onnx.save(proto, str(path))
        with torch.no_grad():
            want = module(*args).numpy()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: a.numpy() for n, a in zip(ins, args, strict=True)})[0]
        err = float(np.abs(got - want).max())
        if not err <= 1e-3:
            raise ExportError(f"optimum layout: {name}/model.onnx differs from torch by {err:.3g} (max abs; bar 1e-3)")
        shutil.copyfile(configs[name], folder / "config.json")
    sched = root / "scheduler"
    sched.mkdir()
    (sched / "scheduler_config.json").write_text(json.dumps({**scheduler_config, "_class_name": "DDIMScheduler"}, indent=2, sort_keys=True))
    tok = root / "tokenizer"
    tok.mkdir()
    for f in TOKENIZER_FILES:
        if (family_root / "tokenizer" / f).is_file():
            shutil.copyfile(family_root / "tokenizer" / f, tok / f)
    import diffusers

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", type(device.tokenizer).__name__],
             "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False}
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return sorted(p for p in root.rglob("*") if p.is_file())
