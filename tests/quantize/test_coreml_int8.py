"""CoreML INT8: weights stored as int8 (or 6-bit palettes), checked in the spec on any OS."""

from __future__ import annotations

from typing import Any

import pytest

from relaydiff.export import get_component, get_exporter
from relaydiff.quantize.coreml_int8 import CoreMLCompressConfig, compress_coreml, compression_ops, package_size


@pytest.mark.parametrize(("target", "op"), [("iOS18", "constexpr_blockwise_shift_scale"), ("iOS17", "constexpr_affine_dequantize")])
def test_int8_weights_are_in_the_spec(tiny_pair: Any, tmp_path: Any, target: str, op: str) -> None:
    ex = get_exporter("coreml", target=target)
    fp = ex.export(get_component("vae_decoder"), tiny_pair[1], tmp_path)
    q = compress_coreml(fp, tmp_path)
    ex.check_spec(q)  # same names, shapes, spec version, metadata
    assert compression_ops(fp.path) == {}
    assert compression_ops(q.path).get(op, 0) > 0, compression_ops(q.path)
    assert package_size(q.path) < package_size(fp.path)
    assert q.precision == "int8" and q.path.name == f"vae_decoder.{target.lower()}.int8.mlpackage"


def test_palettize6(tiny_pair: Any, tmp_path: Any) -> None:
    fp = get_exporter("coreml").export(get_component("vae_decoder"), tiny_pair[1], tmp_path)
    q = compress_coreml(fp, tmp_path, CoreMLCompressConfig(mode="palettize6"))
    assert compression_ops(q.path).get("constexpr_lut_to_dense", 0) > 0


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="'int4'"):
        CoreMLCompressConfig(mode="int4")
