"""The refine/reuse strength predictors: they live in :mod:`relaydiff.core.strength` (the host runs them too)."""

from relaydiff.core.strength import (
    FORMAT,
    PROBE_STRENGTH,
    REFINE_FEATURES,
    REUSE_FEATURES,
    LinearStrength,
    StrengthPredictors,
    refine_features,
    reuse_features,
)

__all__ = ["FORMAT", "PROBE_STRENGTH", "REFINE_FEATURES", "REUSE_FEATURES", "LinearStrength", "StrengthPredictors",
           "refine_features", "reuse_features"]
