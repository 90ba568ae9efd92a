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


def test_resolve_module_paths_counts_from_the_end(tiny_pair: Any) -> None:
    from relaydiff.export import get_component
    from relaydiff.quantize.executorch_int8 import resolve_module_paths

    root = get_component("unet_step").module(tiny_pair[1])
    last = len(root.unet.up_blocks) - 1
    got = resolve_module_paths(root, ["unet.up_blocks.-1", "unet.conv_out", "unet.no_such", f"unet.up_blocks.{last + 1}", "vae"])
    assert got == [f"unet.up_blocks.{last}", "unet.conv_out"]


def _weight_is_dequantized(quantized: Any) -> dict[str, bool]:
    """For each convolution of the converted graph, by module path: does its weight come through a dequantize op?"""
    found = {}
    for node in quantized.graph.nodes:
        if node.op == "call_function" and "conv" in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else node.name
            found[path] = "dequantize" in str(getattr(node.args[1], "target", ""))
    return found


def test_float_modules_keep_their_convolutions_float(tiny_pair: Any, calibration_sets: Any) -> None:
    from relaydiff.export import get_component
    from relaydiff.quantize.executorch_int8 import ExecuTorchInt8Config, quantize_pt2e

    cal = calibration_sets["relay"].for_component("unet_step")[:2]
    comp = get_component("unet_step")
    last = len(comp.module(tiny_pair[1]).unet.up_blocks) - 1
    mixed = _weight_is_dequantized(quantize_pt2e(comp, tiny_pair[1], cal))
    full = _weight_is_dequantized(quantize_pt2e(comp, tiny_pair[1], cal, ExecuTorchInt8Config(float_modules=())))
    assert set(mixed) == set(full) and len(full) > 3
    assert all(full.values())  # everything quantized when no module is kept float
    in_float = {p for p in mixed if p.startswith(f"unet.up_blocks.{last}.") or p in ("unet.conv_out",)}
    assert in_float and not any(mixed[p] for p in in_float)
    assert all(q for p, q in mixed.items() if p not in in_float)


def test_calibration_is_spread_over_the_whole_set() -> None:
    from relaydiff.quantize.executorch_int8 import spread

    items = list(range(100))  # e.g. 17 device steps of each of several prompts, in prompt order
    picked = spread(items, 10)
    assert picked == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # every part of the set, not items[:10]
    assert spread(items[:7], 10) == items[:7]
    with pytest.raises(ValueError, match="max_calibration must be >= 1, got 0"):
        spread(items, 0)
