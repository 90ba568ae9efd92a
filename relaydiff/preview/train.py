"""``relaydiff preview train``: fit the strength predictors on train-split sessions, choose their margins on val.

Labels (DiffusionX: the smallest strength that reaches the reference quality):

- refine: the host refines a device preview of a session's final prompt at each strength of
  ``REFINE_GRID``; the label is the smallest strength whose image scores (attribute accuracy) at
  least as well as the host's image from noise (strength 1), which is also the reference;
- reuse: the device previews the final prompt from the previous round's preview latent at each
  strength of ``REUSE_GRID``; the label is the smallest whose score reaches the from-noise preview's.

The margin added to each regression is the smallest of ``MARGINS`` whose validation prompt accuracy
(each predicted strength snapped up to the grid, looked up in the measured scores) is within one point
of strength 1's. The test split is never read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from relaydiff.core.refine import refine
from relaydiff.core.relay import decode, encode_prompt, relay_side
from relaydiff.preview.predictor import REFINE_FEATURES, REUSE_FEATURES, LinearStrength, StrengthPredictors, refine_features, reuse_features
from relaydiff.preview.session import EditConfig

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel

log = logging.getLogger(__name__)

REFINE_GRID = (0.2, 0.3, 0.5, 0.7, 1.0)
REUSE_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)
MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass
class Sample:
    """One (previous prompt, final prompt) pair measured on the strength grids."""

    refine_x: list[float]
    reuse_x: list[float]
    refine_scores: dict[float, tuple[float, bool]]  # strength -> (attribute accuracy, prompt correct)
    reuse_scores: dict[float, tuple[float, bool]]

    @staticmethod
    def label(scores: dict[float, tuple[float, bool]]) -> float:
        ref = scores[1.0][0]
        return min(s for s, (acc, _) in scores.items() if acc >= ref)


def measure(host: LoadedModel, device: LoadedModel, previous: str, prompt: str, config: EditConfig) -> Sample:
    """Preview ``previous`` then ``prompt`` on the device, refine on the host at every grid strength, score all."""
    from relaydiff.scorer import score

    g = config.guidance_scale
    dev, hst = relay_side(device), relay_side(host)
    de_prev, de = encode_prompt(device, previous), encode_prompt(device, prompt)
    kw: dict[str, Any] = {"steps": config.preview_steps, "sampler": config.sampler, "guidance_scale": g, "seed": config.seed}
    prev = refine(dev, None, de_prev, strength=1.0, **kw).latents
    reuse_scores, noise_preview = {}, None
    for s in REUSE_GRID:
        lat = refine(dev, prev, de, strength=s, **kw).latents
        r = score(decode(device, lat)[0], prompt)
        reuse_scores[s] = (r.attribute_accuracy, r.correct)
        if s == 1.0:
            noise_preview = lat
    assert noise_preview is not None
    he = encode_prompt(host, prompt)
    refine_scores = {}
    for s in REFINE_GRID:
        lat = refine(hst, noise_preview, he, strength=s, steps=config.steps, sampler=config.sampler, guidance_scale=g,
                     seed=config.seed).latents
        r = score(decode(host, lat)[0], prompt)
        refine_scores[s] = (r.attribute_accuracy, r.correct)
    return Sample(refine_features(host, device, noise_preview, prompt, steps=config.steps, seed=config.seed), reuse_features(device, previous, prompt),
                  refine_scores, reuse_scores)


TRAIN_NOISE_SEED = 2**40 + 0x9E_0000  # training pairs' noise seeds (disjoint from the val/test evaluation seeds)


def _pairs(split: str, seed: int) -> Iterator[tuple[str, str, int]]:
    """(previous, final, noise seed) of ``split`` sessions, endlessly, in a shuffled order.

    Every round of the walk stays in the split. Each batch holds final prompts of 1, 2 and 3 objects in
    equal numbers (``relaydiff.preview.edits.sessions``), shuffled, so any prefix -- what a time budget
    measures -- mixes object counts. Noise seeds: val pair i uses the evaluation seed of val prompt i
    (``relaydiff.evaluate.eval_noise_seed``, as ``eval relay --split val``); train pairs count up from
    ``TRAIN_NOISE_SEED``. The test split is never drawn.
    """
    from relaydiff.evaluate import eval_noise_seed
    from relaydiff.preview.edits import sessions

    if split not in ("train", "val"):
        raise ValueError(f"predictor pairs come from 'train' or 'val', not {split!r}")
    rng = np.random.default_rng([0x9A125, seed, 0 if split == "train" else 1])
    batch, i = 0, 0
    while True:
        batch_sessions = sessions(split, 30, seed=seed * 1000 + batch, min_rounds=2, max_rounds=2, keep_split=True)
        for j in rng.permutation(len(batch_sessions)):
            prev, final = batch_sessions[int(j)]
            noise = eval_noise_seed("val", seed, i) if split == "val" else TRAIN_NOISE_SEED + seed * 100_000 + i
            yield prev, final, noise
            i += 1
        batch += 1


def _snap(s: float, grid: tuple[float, ...]) -> float:
    return min(g for g in grid if g >= s - 1e-9)


def choose_margin(model: LinearStrength, X: list[list[float]], scores: list[dict[float, tuple[float, bool]]],
                  grid: tuple[float, ...]) -> tuple[float, dict[str, float]]:
    """The smallest margin whose snapped strengths keep validation prompt accuracy within 1 point of strength 1's."""
    ref = float(np.mean([sc[1.0][1] for sc in scores]))
    for m in MARGINS:
        chosen = [_snap(replace(model, margin=m)(x), grid) for x in X]
        acc = float(np.mean([sc[s][1] for s, sc in zip(chosen, scores)]))
        if acc >= ref - 0.01 or m == MARGINS[-1]:
            return m, {"val_accuracy": acc, "val_accuracy_at_1": ref, "val_mean_strength": float(np.mean(chosen))}
    raise AssertionError("unreachable")


def _object_counts(prompts: list[str]) -> dict[str, int]:
    """How many final prompts have 1, 2 and 3 objects (the record of a training run's mix)."""
    from relaydiff.world.grammar import parse_prompt

    counts = {"1": 0, "2": 0, "3": 0}
    for p in prompts:
        counts[str(parse_prompt(p).n_objects)] += 1
    return counts


def train_predictors(host: LoadedModel, device: LoadedModel, *, minutes: float, config: EditConfig, seed: int = 0,
                     val_fraction: float = 0.3, min_samples: int = 4, progress: bool = False) -> StrengthPredictors:
    """Measure train and val pairs until ``minutes`` run out (at least ``min_samples`` of each), fit, choose margins."""
    from tqdm.auto import tqdm

    deadline = time.monotonic() + 60.0 * minutes
    train: list[Sample] = []
    val: list[Sample] = []
    train_prompts: list[str] = []
    val_prompts: list[str] = []
    tr, va = _pairs("train", seed), _pairs("val", seed)
    bar = tqdm(desc="preview train samples", disable=not progress)
    while len(train) < min_samples or len(val) < min_samples or time.monotonic() < deadline:
        want_val = len(val) < max(min_samples, val_fraction * (len(train) + len(val)))
        prev, final, noise = next(va if want_val else tr)
        sample = measure(host, device, prev, final, replace(config, seed=noise))
        (val if want_val else train).append(sample)
        (val_prompts if want_val else train_prompts).append(final)
        bar.update(1)
    bar.close()
    refine_model = LinearStrength.fit(REFINE_FEATURES, [s.refine_x for s in train], [Sample.label(s.refine_scores) for s in train],
                                      lo=min(REFINE_GRID))
    reuse_model = LinearStrength.fit(REUSE_FEATURES, [s.reuse_x for s in train], [Sample.label(s.reuse_scores) for s in train],
                                     lo=min(REUSE_GRID))
    m_refine, v_refine = choose_margin(refine_model, [s.refine_x for s in val], [s.refine_scores for s in val], REFINE_GRID)
    m_reuse, v_reuse = choose_margin(reuse_model, [s.reuse_x for s in val], [s.reuse_scores for s in val], REUSE_GRID)
    training = {"train_samples": len(train), "val_samples": len(val), "minutes": minutes, "seed": seed,
                "config": {"steps": config.steps, "preview_steps": config.preview_steps, "sampler": config.sampler,
                           "guidance_scale": config.guidance_scale},
                "train_objects": _object_counts(train_prompts), "val_objects": _object_counts(val_prompts),
                "refine_val": v_refine, "reuse_val": v_reuse,
                "refine_label_mean": float(np.mean([Sample.label(s.refine_scores) for s in train])),
                "reuse_label_mean": float(np.mean([Sample.label(s.reuse_scores) for s in train]))}
    return StrengthPredictors(replace(refine_model, margin=m_refine), replace(reuse_model, margin=m_reuse), training)
