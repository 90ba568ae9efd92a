"""A copy of the tiny family with a tiny random-weight StableDiffusionSafetyChecker (diffusers' layout: safety_checker/ and
feature_extractor/ in the pipeline folder), for the on-device safety tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def add_safety_checker(family: Path, out: Path, *, flag_everything: bool, seed: int = 0) -> Path:
    """Copy ``family`` to ``out`` and save a tiny checker into it (CLIP vision tower of 2 layers, 32 x 32 input).

    ``flag_everything``: concept thresholds of -2 (below any cosine distance): every image is flagged; otherwise the
    thresholds are +2 and nothing is. The concept embeddings are random either way, so the scores vary with the image.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    shutil.copytree(family, out)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)  # never special: no +0.01 adjustment
    checker.save_pretrained(str(out / "safety_checker"), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(out / "feature_extractor"))
    index = json.loads((out / "model_index.json").read_text())
    index.update({"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                  "feature_extractor": ["transformers", "CLIPImageProcessor"]})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
