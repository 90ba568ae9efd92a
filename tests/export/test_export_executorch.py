"""ExecuTorch: the explicit lowering chain to a .pte with XNNPACK, run by ExecuTorch's Python runtime against torch."""

from __future__ import annotations

import os
from typing import Any

import pytest

from relaydiff.export import get_exporter

SLOW = pytest.mark.skipif(not os.environ.get("RELAYDIFF_SLOW"), reason="slow (about 40 s of lowering): set RELAYDIFF_SLOW=1")


@pytest.mark.parametrize(
    "name", ["unet_step", "vae_decoder", "text_encoder", pytest.param("unet", marks=[pytest.mark.slow, SLOW])]
)
def test_executorch_export_matches_torch(exported: Any, device_model: Any, name: str) -> None:
    artifact = exported("executorch", name)
    report = get_exporter("executorch").validate(artifact, device_model)
    assert report.max_abs_error <= 1e-3, str(report)
    print(report)


def test_unet_step_is_mostly_delegated_to_xnnpack(exported: Any) -> None:
    meta = exported("executorch", "unet_step").metadata
    assert meta["delegate_calls"] > 0, meta
    outside = meta["ops_outside_delegates"]  # plain JSON records, not a mapping or a repr string
    assert isinstance(outside, list) and all(set(o) == {"op", "count"} and isinstance(o["op"], str) and o["count"] > 0 for o in outside)
