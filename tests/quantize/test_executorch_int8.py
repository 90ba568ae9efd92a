"""ExecuTorch INT8: PT2E (XNNPACKQuantizer) calibrated on the relay-aware set, lowered to XNNPACK, run by the ExecuTorch runtime.

Slow (PT2E + XNNPACK lowering: ~35 s for the text encoder, ~70 s for the decoder on two shared cores): RELAYDIFF_SLOW=1.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

SLOW = pytest.mark.skipif(not os.environ.get("RELAYDIFF_SLOW"), reason="slow (PT2E + XNNPACK lowering): set RELAYDIFF_SLOW=1")


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("name", ["text_encoder", "vae_decoder", "unet_step"])
def test_executorch_int8_runs_within_bounds(tiny_pair: Any, calibration_sets: Any, tmp_path: Any, name: str) -> None:
    from relaydiff.export import get_component, get_exporter
    from relaydiff.quantize.executorch_int8 import export_int8

    cs = calibration_sets["relay"]
    artifact = export_int8(get_component(name), tiny_pair[1], cs.for_component(name), tmp_path, calibration_summary=cs.summary())
    assert artifact.metadata["delegate_calls"] > 0
    held_out = cs.for_component(name)[-1]
    report = get_exporter("executorch").validate(artifact, tiny_pair[1], held_out)  # raises ValidationError below the bar
    print(report)


def test_needs_calibration(tiny_pair: Any) -> None:
    from relaydiff.export import get_component
    from relaydiff.quantize.executorch_int8 import quantize_lower

    with pytest.raises(ValueError, match="at least one calibration input"):
        quantize_lower(get_component("vae_decoder"), tiny_pair[1], [])
