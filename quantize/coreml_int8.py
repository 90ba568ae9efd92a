"""INT8 CoreML: per-channel int8 weights (``coremltools.optimize.coreml.linear_quantize_weights``), optional 6-bit palettes.

Weights are stored compressed and dequantized on the fly (``constexpr_affine_dequantize`` up to iOS17,
``constexpr_blockwise_shift_scale`` from iOS18; palettes: ``constexpr_lut_to_dense``); activations stay
at the model's compute precision. Linux cannot run CoreML, so :func:`compression_ops` checks the saved
spec for those ops instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from relaydiff.core.metrics import Tolerance
from relaydiff.export.base import Artifact, ExportError, tool_versions
from relaydiff.export.coreml import mil_op_counts

WEIGHT_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")  # int8 weights (iOS<=17, iOS18+)
PALETTE_OPS = ("constexpr_lut_to_dense",)  # palettized weights
MODES = ("int8", "palettize6")


@dataclass(frozen=True)
class CoreMLCompressConfig:
    """Options of one CoreML weight compression."""

    mode: str = "int8"  # "int8": linear symmetric per-channel int8; "palettize6": 6-bit k-means palettes
    weight_threshold: int = 0  # compress weights with at least this many elements (0: all; coremltools' default is 2048)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def compress_coreml(fp: Artifact, out_dir: str | Path, config: CoreMLCompressConfig | None = None) -> Artifact:
    """Compress the weights of a CoreML artifact; write ``<name>.<target>.<mode>.mlpackage`` in ``out_dir``.

    Raises:
        ExportError: coremltools failed (its message is quoted).
    """
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    config = config or CoreMLCompressConfig()
    if fp.exporter != "coreml":
        raise ValueError(f"expected a CoreML artifact, got {fp.exporter}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = fp.files["mlpackage"]
    path = out / src.name.replace(".mlpackage", f".{config.mode}.mlpackage")
    t0 = time.perf_counter()
    try:
        mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
        if config.mode == "int8":
            op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                             weight_threshold=config.weight_threshold)
            compressed = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
        else:
            op = cto.OpPalettizerConfig(mode="kmeans", nbits=6, granularity="per_tensor", weight_threshold=max(config.weight_threshold, 64))
            compressed = cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
        compressed.user_defined_metadata["relaydiff.weights"] = config.mode
        compressed.save(str(path))
    except Exception as exc:  # coremltools raises many types; quote it
        raise ExportError(f"CoreML {config.mode} compression of {fp.component!r} failed: {type(exc).__name__}: {exc}") from exc
    ops = compression_ops(path)
    metadata = {
        **{k: v for k, v in fp.metadata.items() if k in ("family_id", "family_root", "unet_variant", "description",
                                                         "specification_version", "exporter_options")},
        "quantization": {"tool": "coremltools.optimize.coreml", "mode": config.mode, "weight_threshold": config.weight_threshold},
        "compression_ops": ops,
        "quantize_seconds": round(time.perf_counter() - t0, 3),
        "versions": tool_versions(),
    }
    artifact = Artifact(
        exporter="coreml", component=fp.component, signature=fp.signature, files={"mlpackage": path}, runnable=("mlpackage",),
        precision="int8", tolerance=Tolerance(min_psnr_db=30.0), metadata=metadata,
    )
    artifact.write_metadata()
    return artifact


def compression_ops(path: str | Path) -> dict[str, int]:
    """Counts of the compressed-weight ops in a saved ML Program."""
    counts = mil_op_counts(Path(path))
    return {op: counts[op] for op in (*WEIGHT_OPS, *PALETTE_OPS) if counts.get(op)}


def package_size(path: str | Path) -> int:
    """Bytes of every file in an .mlpackage folder (or of a plain file)."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
