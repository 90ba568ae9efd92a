"""DiffusionX's bidirectional strength predictors, as scikit-learn ridge regressions saved as JSON.

In core so that both the device's editing session (``relaydiff.preview``) and the host service
(``host/controller.py``, which picks the refine strength of a ``RefineHandoff`` that leaves it to the
host) can run them; ``relaydiff.preview.predictor`` re-exports these names.

- refine (host): the smallest refine strength that reaches the host-only quality, from the prompt's
  complexity and the host/device disagreement at one probe step (both models' conditional noise
  predictions on the preview latent re-noised to t at strength ``PROBE_STRENGTH``; one UNet call each);
- reuse (device): the smallest reuse strength that reaches a from-noise preview's quality, from the
  distance of the two prompts' text embeddings.

A ridge model is a mean, a scale, coefficients and an intercept: it is stored as those numbers in
JSON (no pickle), plus a safety margin chosen on the validation split and the clip range.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from relaydiff.core.errors import RelaydiffError

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel

FORMAT = "relaydiff-preview-predictors/1"
PROBE_STRENGTH = 0.5  # the probe step re-noises the preview to the grid timestep of this strength
REFINE_FEATURES = ("complexity", "n_objects", "disagreement")
REUSE_FEATURES = ("flat_cosine_distance", "mean_cosine_distance", "complexity_change")


def _complexity(prompt: str) -> tuple[float, float]:
    from relaydiff.world.grammar import parse_prompt

    try:
        spec = parse_prompt(prompt)
    except ValueError:  # outside the grammar: word count stands in for complexity
        return float(len(prompt.split())), 1.0
    return float(spec.complexity), float(spec.n_objects)


@torch.no_grad()
def refine_features(host: LoadedModel, device: LoadedModel, latent: torch.Tensor, prompt: str, *, steps: int,
                    seed: int) -> list[float]:
    """[complexity, n_objects, disagreement] of refining ``latent`` for ``prompt`` (one host and one device UNet call).

    ``steps`` is N of the host's schedule (the probe timestep is its strength-``PROBE_STRENGTH`` one) and
    ``seed`` the refinement's noise seed (the probe re-noises with the same noise).
    """
    from diffusers.utils.torch_utils import randn_tensor

    from relaydiff.core.denoiser import Conditioning, unet_denoiser
    from relaydiff.core.refine import plan
    from relaydiff.core.relay import encode_prompt
    from relaydiff.core.schedulers import build_scheduler, set_steps

    sch = build_scheduler("ddim", host.scheduler_config)
    set_steps(sch, steps)
    t = plan(sch, steps, PROBE_STRENGTH).noise_timestep
    noise = randn_tensor(tuple(latent.shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    x = sch.add_noise(latent.float(), noise, torch.tensor([t]))
    tt = torch.tensor(t)
    eh = unet_denoiser(host)(x, tt, Conditioning(encode_prompt(host, prompt)[0]))
    ed = unet_denoiser(device)(x, tt, Conditioning(encode_prompt(device, prompt)[0]))
    disagreement = float((eh - ed).norm() / eh.norm().clamp_min(1e-8))
    return [*_complexity(prompt), disagreement]


@torch.no_grad()
def reuse_features(device: LoadedModel, previous: str, prompt: str) -> list[float]:
    """[flat cosine distance, mean-pooled cosine distance, |complexity change|] of the two prompts' embeddings."""
    from relaydiff.core.relay import encode_prompt

    a, b = encode_prompt(device, previous)[0][0], encode_prompt(device, prompt)[0][0]  # (L, D)
    flat = 1.0 - float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    mean = 1.0 - float(torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0))
    return [flat, mean, abs(_complexity(prompt)[0] - _complexity(previous)[0])]


@dataclass(frozen=True)
class LinearStrength:
    """A ridge regression of a strength on standardized features, plus a margin, clipped to [lo, 1]."""

    features: tuple[str, ...]  # feature names, in order
    mean: tuple[float, ...]  # per-feature mean (standardization)
    scale: tuple[float, ...]  # per-feature standard deviation (standardization)
    coef: tuple[float, ...]  # ridge coefficients on the standardized features
    intercept: float
    margin: float = 0.0  # added to the regression (chosen on the validation split)
    lo: float = 0.1  # the smallest strength it predicts

    def __post_init__(self) -> None:
        n = len(self.features)
        for name in ("mean", "scale", "coef"):
            v = getattr(self, name)
            if len(v) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                raise RelaydiffError(f"strength predictor {name} is {v!r}; expected {n} finite numbers")
        if any(s <= 0 for s in self.scale):
            raise RelaydiffError(f"strength predictor scale is {self.scale!r}; expected positive numbers")
        for name in ("intercept", "margin", "lo"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RelaydiffError(f"strength predictor {name} is {v!r}; expected a finite number")
        if not 0.0 < self.lo <= 1.0:
            raise RelaydiffError(f"strength predictor lo is {self.lo!r}; expected a number in (0, 1]")

    def raw(self, x: list[float]) -> float:
        """The regression's value, before margin and clipping."""
        if len(x) != len(self.features):
            raise RelaydiffError(f"strength predictor takes {len(self.features)} features {self.features}, got {len(x)}")
        return self.intercept + sum(c * (v - m) / s for c, v, m, s in zip(self.coef, x, self.mean, self.scale))

    def __call__(self, x: list[float]) -> float:
        return float(min(1.0, max(self.lo, self.raw(x) + self.margin)))

    @classmethod
    def fit(cls, features: tuple[str, ...], X: list[list[float]], y: list[float], *, alpha: float = 1.0, lo: float = 0.1) -> LinearStrength:
        """Fit scikit-learn's Ridge on standardized X (StandardScaler)."""
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        if len(X) < 2:
            raise RelaydiffError(f"a strength predictor needs at least 2 samples, got {len(X)}")
        scaler = StandardScaler().fit(X)
        scale = [float(s) if s > 0 else 1.0 for s in scaler.scale_]
        model = Ridge(alpha=alpha).fit(scaler.transform(X), y)
        return cls(features, tuple(float(m) for m in scaler.mean_), tuple(scale), tuple(float(c) for c in model.coef_),
                   float(model.intercept_), 0.0, lo)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> LinearStrength:
        if not isinstance(obj, dict):
            raise RelaydiffError(f"{where} is {type(obj).__name__}; expected a JSON object")
        known = {"features", "mean", "scale", "coef", "intercept", "margin", "lo"}
        if set(obj) - known or {"features", "mean", "scale", "coef", "intercept"} - set(obj):
            raise RelaydiffError(f"{where} has keys {sorted(obj)}; expected {sorted(known)}")
        try:
            return cls(tuple(str(f) for f in obj["features"]), tuple(obj["mean"]), tuple(obj["scale"]), tuple(obj["coef"]),
                       obj["intercept"], obj.get("margin", 0.0), obj.get("lo", 0.1))
        except TypeError as exc:
            raise RelaydiffError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class StrengthPredictors:
    """The host's refine-strength and the device's reuse-strength predictors, with how they were trained."""

    refine: LinearStrength
    reuse: LinearStrength
    training: dict[str, Any]  # samples, minutes, validation figures (for the record; not read back into logic)

    def refine_strength(self, features: list[float]) -> float:
        return self.refine(features)

    def reuse_strength(self, features: list[float]) -> float:
        return self.reuse(features)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "refine": asdict(self.refine), "reuse": asdict(self.reuse), "training": self.training}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> StrengthPredictors:
        """Read a predictors JSON file (written by :meth:`save`); raises RelaydiffError on anything else."""
        from relaydiff.core.family import read_json

        obj = read_json(Path(path))
        if obj.get("format") != FORMAT:
            raise RelaydiffError(f"'{path}' format is {obj.get('format')!r}; expected {FORMAT!r}")
        if obj.get("refine", {}).get("features") not in (list(REFINE_FEATURES),) or \
                obj.get("reuse", {}).get("features") not in (list(REUSE_FEATURES),):
            raise RelaydiffError(f"'{path}' features differ from {REFINE_FEATURES} / {REUSE_FEATURES}")
        training = obj.get("training", {})
        return cls(LinearStrength.from_json(obj["refine"], f"'{path}' refine"),
                   LinearStrength.from_json(obj["reuse"], f"'{path}' reuse"), training if isinstance(training, dict) else {})


def default_predictors_path(family_root: str | Path) -> Path:
    """Where a family keeps its trained predictors: ``<family>/preview/predictors.json`` (like ``cache_policy/``)."""
    return Path(family_root) / "preview" / "predictors.json"


def load_predictors(family_root: str | Path, choice: StrengthPredictors | str | Path | None = "default") -> StrengthPredictors | None:
    """The predictors ``choice`` names: "default" is the family's own file (None when it has none), a path is
    that file (it must exist), None is none, and a StrengthPredictors passes through.

    Raises:
        RelaydiffError: a named file that is missing or is not a predictors JSON.
    """
    if choice is None or isinstance(choice, StrengthPredictors):
        return choice
    if isinstance(choice, str) and choice == "default":
        path = default_predictors_path(family_root)
        return StrengthPredictors.load(path) if path.is_file() else None
    path = Path(choice)
    if not path.is_file():
        raise RelaydiffError(f"strength predictors file not found: '{path}'")
    return StrengthPredictors.load(path)
