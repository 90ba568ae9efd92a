"""Fixed train / validation / test splits of the world's captions and of evaluation noise seeds.

A caption belongs to a split by a hash of its **scene phrase**: the caption without its optional
``" on a <colour> background"`` clause, so a held-out scene is held out with and without the
background named. The bucket is ``blake2b(phrase) mod 100``: buckets 0-9 are the **test** split,
10-19 the **validation** split, the rest **train** (see docs/world.md, "Splits").

- Training never draws a test or validation caption: the family trainer samples scenes with
  ``split="train"`` and :func:`relaydiff.world.sample_scene` rejects the others.
- Model selection and tuning use the validation split only; the test split is for reported figures
  (``relaydiff eval relay`` uses it by default).
- Noise seeds of evaluation are split as well: test prompt ``i`` uses noise seed
  ``TEST_NOISE_SEED + i``, validation ``VAL_NOISE_SEED + i``. Training seeds its noise from
  ``torch.manual_seed`` values of at least ``2**40`` (``relaydiff.embedded.train``), disjoint from both.

The hash is blake2b, not Python's ``hash()``, so the split is the same in every process and on
every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relaydiff.world.scene import Scene

SPLITS = ("train", "val", "test")
TEST_BUCKETS = range(0, 10)  # 10% of scene phrases
VAL_BUCKETS = range(10, 20)  # 10% of scene phrases
N_BUCKETS = 100
TEST_NOISE_SEED = 1_000_000_000  # test prompt i: noise seed TEST_NOISE_SEED + i
VAL_NOISE_SEED = 2_000_000_000  # validation prompt i: noise seed VAL_NOISE_SEED + i
_PROMPT_SEED = {"val": 0x5EED_0001, "test": 0x5EED_0002, "train": 0x5EED_0003}  # prompt-drawing rngs


def scene_phrase(caption: str) -> str:
    """The caption without its background clause, normalised (the key of :func:`split_of`).

    Raises:
        ValueError: if ``caption`` is outside the world grammar.
    """
    from relaydiff.world.grammar import parse_prompt

    return replace(parse_prompt(caption), background=None).caption()


def bucket_of(caption: str) -> int:
    """The caption's hash bucket in ``0..99`` (from its scene phrase)."""
    return _bucket(scene_phrase(caption))


def _bucket(phrase: str) -> int:
    digest = hashlib.blake2b(phrase.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % N_BUCKETS


def split_of(caption: str) -> str:
    """``"test"``, ``"val"`` or ``"train"``: the split the caption belongs to."""
    return _split_of_bucket(bucket_of(caption))


def split_of_scene(scene: "Scene") -> str:
    """The split of ``scene``'s caption (without parsing it back)."""
    return _split_of_bucket(_bucket(replace(scene.spec(), background=None).caption()))


def _split_of_bucket(b: int) -> str:
    if b in TEST_BUCKETS:
        return "test"
    if b in VAL_BUCKETS:
        return "val"
    return "train"


def check_split(split: str | None) -> None:
    """Raise ValueError unless ``split`` is None or one of SPLITS."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def noise_seed(split: str, index: int) -> int:
    """The noise seed of evaluation prompt ``index`` of ``split`` ("val" or "test")."""
    bases = {"test": TEST_NOISE_SEED, "val": VAL_NOISE_SEED}
    if split not in bases:
        raise ValueError(f"noise seeds are defined for 'val' and 'test', got {split!r}")
    if not 0 <= index < 10**9:
        raise ValueError(f"index must be in [0, 1e9), got {index!r}")
    return bases[split] + index


def split_prompts(split: str, n: int, n_objects: int, seed: int = 0) -> list[str]:
    """``n`` captions with ``n_objects`` objects from ``split``, deterministic in ``(split, n_objects, seed)``.

    Scenes are drawn with :func:`relaydiff.world.sample_scene` (rejecting other splits). Distinct
    captions come first; if the split holds fewer than ``n`` distinct ones (1-object test captions:
    about 110), the list continues with repeats in the same order (each gets its own noise seed).

    Raises:
        ValueError: on an unknown split, ``n < 0`` or ``n_objects`` not in 1..3.
    """
    import numpy as np

    from relaydiff.world.sampling import sample_scene

    check_split(split)
    if split is None:
        raise ValueError("split_prompts needs a split, got None")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    rng = np.random.default_rng([_PROMPT_SEED[split], n_objects, seed])
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n and tries < 50 * n + 1000:
        seen.setdefault(sample_scene(rng, n_objects, split=split).caption())
        tries += 1
    distinct = list(seen)
    if not distinct:
        return []
    return [distinct[i % len(distinct)] for i in range(n)]
