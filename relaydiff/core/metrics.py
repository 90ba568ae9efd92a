"""How close one output is to a reference: PSNR, image PSNR and a declared tolerance, in one place.

Exporters validate artifacts with these, bundles re-check their parity fixtures with them, and
quantization reports its drift with them, so "within tolerance" means the same thing everywhere.
Written by hand because no installed library computes ml-stable-diffusion's peak-of-reference PSNR
on arbitrary tensors (scikit-image's takes a fixed data range).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def psnr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of ``got`` against ``ref`` with the reference's peak |value|, as ml-stable-diffusion computes it."""
    peak = float(np.abs(ref).max())
    rmse = float(np.sqrt(np.mean((got.astype(np.float64) - ref.astype(np.float64)) ** 2)))
    return 20.0 * math.log10((peak + 1e-5) / (rmse + 1e-10))


def image_psnr(got: np.ndarray, ref: np.ndarray, *, peak: float = 1.0) -> float:
    """PSNR in dB of two images with a fixed ``peak`` (1 for [0, 1] floats, 255 for uint8); inf when identical."""
    mse = float(np.mean((got.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak**2 / mse))


@dataclass(frozen=True)
class Tolerance:
    """How close an output must be to its torch fp32 reference. At least one bound is set."""

    max_abs: float | None = None  # largest allowed |output - reference| over all elements
    min_psnr_db: float | None = None  # smallest allowed PSNR (apple/ml-stable-diffusion's quality gate)

    def __post_init__(self) -> None:
        if self.max_abs is None and self.min_psnr_db is None:
            raise ValueError("a tolerance needs max_abs, min_psnr_db or both")

    def describe(self) -> str:
        parts = []
        if self.max_abs is not None:
            parts.append(f"max abs error <= {self.max_abs:g}")
        if self.min_psnr_db is not None:
            parts.append(f"PSNR >= {self.min_psnr_db:g} dB")
        return " and ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tolerance:
        return cls(max_abs=data.get("max_abs"), min_psnr_db=data.get("min_psnr_db"))


@dataclass(frozen=True)
class Closeness:
    """One output against its reference: the error figures and whether they meet the tolerance."""

    max_abs: float  # inf when the shapes differ
    psnr_db: float  # -inf when the shapes differ
    passed: bool


def compare(got: np.ndarray, ref: np.ndarray, tolerance: Tolerance) -> Closeness:
    """Max abs error and PSNR of ``got`` against ``ref``, and whether both meet ``tolerance`` (a shape mismatch fails)."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return Closeness(float("inf"), float("-inf"), False)
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    p = psnr_db(got, ref)
    ok = (math.isfinite(err) and (tolerance.max_abs is None or err <= tolerance.max_abs)
          and (tolerance.min_psnr_db is None or p >= tolerance.min_psnr_db))
    return Closeness(err, p, bool(ok))
