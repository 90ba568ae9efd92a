"""A classical (no neural network) scorer of prompt fidelity for world images.

``score(image, prompt)`` segments the image by palette colour, classifies each blob's shape
and size by geometry, and checks every attribute the prompt states; see docs/world.md.
"""

from relaydiff.scorer.detect import Detection, detect, detect_background
from relaydiff.scorer.score import ObjectCheck, ScoreResult, score, summarize

__all__ = [
    "Detection",
    "ObjectCheck",
    "ScoreResult",
    "detect",
    "detect_background",
    "score",
    "summarize",
]
