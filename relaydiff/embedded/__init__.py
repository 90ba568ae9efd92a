"""The embedded default model family (``tinyshapes``): architectures, tokenizer and CPU training.

Importing this package is cheap; torch/diffusers load only when a function needs them.
"""

from relaydiff.embedded.models import FamilyArch, TextArch, UNetArch, VAEArch
from relaydiff.embedded.train import StageConfig, TrainConfig, main, train_family

__all__ = [
    "FamilyArch",
    "StageConfig",
    "TextArch",
    "TrainConfig",
    "UNetArch",
    "VAEArch",
    "main",
    "train_family",
]
