"""(c) CoreML: the saved spec checked with coremltools on any OS; the runtime parity only on macOS.

Spec: ML Program; inputs/outputs (names, dtypes, shapes) are the manifest's; the specification version is
8 (iOS17) or 9 (iOS18) and matches the deployment target the artifact was exported for; INT8
artifacts hold int8 weight ops (constexpr_blockwise_shift_scale on iOS18, constexpr_affine_dequantize on
iOS17) and fp32 ones none.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SPEC_VERSIONS = {"iOS17": 8, "iOS18": 9}
INT8_WEIGHT_OPS = {"iOS17": "constexpr_affine_dequantize", "iOS18": "constexpr_blockwise_shift_scale"}


def _metadata(bundle_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    path = bundle_dir / f"{entry['file']}.json"
    return json.loads(path.read_text()).get("metadata", {}) if path.is_file() else {}


def _features(features: Any) -> list[dict[str, Any]]:
    from coremltools.proto import FeatureTypes_pb2 as ft

    kinds = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16", ft.ArrayFeatureType.INT32: "int32"}
    out = []
    for f in features:
        arr = f.type.multiArrayType
        out.append({"name": f.name, "dtype": kinds.get(arr.dataType, f"type {arr.dataType}"), "shape": [int(d) for d in arr.shape]})
    return out


def _op_counts(spec: Any) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(block: Any) -> None:
        for op in block.operations:
            counts[op.type] = counts.get(op.type, 0) + 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return counts


@pytest.mark.artifacts(target="coreml")
def test_coreml_spec(entry: dict[str, Any], bundle_dir: Path) -> None:
    import coremltools as ct

    spec = ct.utils.load_spec(str(bundle_dir / entry["file"]))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert _features(spec.description.input) == entry["inputs"]
    assert _features(spec.description.output) == entry["outputs"]
    target = _metadata(bundle_dir, entry).get("exporter_options", {}).get("target")
    assert target in SPEC_VERSIONS, f"{entry['file']}: deployment target {target!r} is not iOS17/iOS18"
    assert spec.specificationVersion == SPEC_VERSIONS[target], (spec.specificationVersion, target)
    ops = _op_counts(spec)
    weight_ops = {op: n for op, n in ops.items() if op.startswith("constexpr_")}
    if entry["precision"] == "int8":
        assert ops.get(INT8_WEIGHT_OPS[target], 0) > 0, f"{entry['file']}: no {INT8_WEIGHT_OPS[target]} op; constexpr ops {weight_ops}"
        recorded = entry["parity"].get("compression_ops", {})
        assert all(ops.get(op) == n for op, n in recorded.items()), f"{entry['file']}: manifest says {recorded}, spec has {weight_ops}"
    else:
        assert not weight_ops, f"{entry['file']}: an fp32 artifact holds compressed weights {weight_ops}"


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML runtime needs macOS (coremltools can run a model only there)")
@pytest.mark.artifacts(target="coreml", component=("unet_step", "vae_decoder"))
def test_coreml_runtime_parity(entry: dict[str, Any], pair: tuple[Any, Any], samples: dict[str, list[dict[str, Any]]],
                               open_file: Callable[..., Any]) -> None:
    from relaydiff.core.metrics import psnr_db
    from relaydiff.export.components import component_for

    comp = component_for(entry["component"], pair[1])
    session = open_file(entry)
    tol = entry["tolerance"]
    problems = []
    for i, x in enumerate(samples[entry["component"]]):
        for name, want in comp.reference(pair[1], x).items():
            y = np.asarray(session(x)[name], dtype=np.float32)
            err, p = float(np.abs(y - want).max()), psnr_db(y, want)
            if (tol.get("max_abs") is not None and err > tol["max_abs"]) or (tol.get("min_psnr_db") is not None and p < tol["min_psnr_db"]):
                problems.append(f"input {i} {name}: max abs {err:.3g}, PSNR {p:.1f} dB (bar {tol})")
    assert not problems, "\n".join(problems)
