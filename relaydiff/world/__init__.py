"""A procedural image world: coloured shapes on plain backgrounds, with captions from a grammar.

The full specification (palette, geometry, grammar, sampling) is ``docs/world.md``.
"""

from relaydiff.world.grammar import parse_prompt, vocabulary
from relaydiff.world.render import object_mask, render, render_batch, shape_mask
from relaydiff.world.sampling import make_batch, sample_prompts, sample_scene
from relaydiff.world.splits import SPLITS, noise_seed, scene_phrase, split_of, split_prompts
from relaydiff.world.scene import (
    Obj,
    ObjSpec,
    PromptSpec,
    Relation,
    Scene,
    position_holds,
    relation_holds,
)
from relaydiff.world.vocab import (
    BACKGROUNDS,
    PALETTE,
    POSITION_PHRASES,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
)

__all__ = [
    "BACKGROUNDS",
    "PALETTE",
    "POSITION_PHRASES",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Obj",
    "ObjSpec",
    "PromptSpec",
    "Relation",
    "Scene",
    "make_batch",
    "noise_seed",
    "object_mask",
    "parse_prompt",
    "position_holds",
    "relation_holds",
    "render",
    "render_batch",
    "sample_prompts",
    "sample_scene",
    "scene_phrase",
    "shape_mask",
    "split_of",
    "split_prompts",
    "vocabulary",
]
