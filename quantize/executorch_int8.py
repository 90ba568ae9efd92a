"""INT8 ExecuTorch: PT2E quantization with the XNNPACK quantizer, calibrated on recorded inputs, then lowered to XNNPACK.

The chain, each stage kept (:class:`~relaydiff.export.executorch.Lowering` plus the quantized module):

``torch.export.export(...).module()`` -> ``prepare_pt2e(m, XNNPACKQuantizer)`` -> run the calibration
inputs -> ``convert_pt2e`` -> ``torch.export.export`` -> ``to_edge_transform_and_lower(XnnpackPartitioner)``
-> ``to_executorch()``. ``prepare_pt2e``/``convert_pt2e`` come from torchao 0.18
(``torchao.quantization.pt2e.quantize_pt2e``); the quantizer is ExecuTorch 1.5.1's
``XNNPACKQuantizer`` with its symmetric per-channel int8 config (static activations).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaydiff.export.base import Artifact, ExportError, Tolerance, _versions
from relaydiff.export.executorch import Lowering
from relaydiff.quantize.calibration import Inputs
from relaydiff.quantize.onnx_int8 import INT8_TOLERANCES

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel
    from relaydiff.export.components import Component


@dataclass(frozen=True)
class ExecuTorchInt8Config:
    """Options of one PT2E quantization."""

    per_channel: bool = True  # per-output-channel weight scales
    max_calibration: int = 64  # at most this many calibration inputs are run through the observers


def quantize_lower(component: Component, model: LoadedModel, calibration: Sequence[Inputs],
                   config: ExecuTorchInt8Config | None = None) -> tuple[Any, Lowering]:
    """Quantize ``component`` with PT2E on ``calibration`` and lower it; return (quantized module, every lowering stage).

    Raises:
        ExportError: a stage failed (named, error quoted).
    """
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = config or ExecuTorchInt8Config()
    if not calibration:
        raise ValueError("PT2E quantization needs at least one calibration input")
    signature = component.signature(model)

    def args_of(x: Inputs) -> tuple[Any, ...]:
        return tuple(torch.from_numpy(x[s.name]) for s in signature.inputs)

    stage = "torch.export.export"
    try:
        with torch.no_grad():
            captured = torch.export.export(component.module(model), args_of(calibration[0]), strict=False).module()
            stage = "prepare_pt2e"
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=config.per_channel))
            prepared = prepare_pt2e(captured, quantizer)
            stage = "calibration"
            for x in calibration[: config.max_calibration]:
                prepared(*args_of(x))
            stage = "convert_pt2e"
            quantized = convert_pt2e(prepared)
            stage = "torch.export.export (quantized)"
            exported = torch.export.export(quantized, args_of(calibration[0]), strict=False)
        stage = "to_edge_transform_and_lower"
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        stage = "to_executorch"
        program = edge.to_executorch()
    except Exception as exc:  # each stage raises its own types; name the stage and keep the message
        raise ExportError(f"ExecuTorch INT8 {stage} of {component.name!r} failed: {type(exc).__name__}: {exc}") from exc
    return quantized, Lowering(exported, edge, program)


def export_int8(component: Component, model: LoadedModel, calibration: Sequence[Inputs], out_dir: str | Path,
                config: ExecuTorchInt8Config | None = None, calibration_summary: dict[str, Any] | None = None) -> Artifact:
    """Write ``<component>.int8.pte`` and its metadata JSON; return the artifact (run it with the ``executorch`` exporter)."""
    config = config or ExecuTorchInt8Config()
    t0 = time.perf_counter()
    _, lowering = quantize_lower(component, model, calibration, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{component.name}.int8.pte"
    path.write_bytes(lowering.program.buffer)
    artifact = Artifact(
        exporter="executorch", component=component.name, signature=component.signature(model), files={"pte": path},
        runnable=("pte",), precision="int8", tolerance=INT8_TOLERANCES.get(component.name, Tolerance(min_psnr_db=12.0)),
        metadata={
            "family_id": model.family_id, "description": component.description,
            "quantization": {"tool": "torchao pt2e + executorch XNNPACKQuantizer", "per_channel": config.per_channel,
                             "max_calibration": config.max_calibration},
            "calibration": calibration_summary, "export_seconds": round(time.perf_counter() - t0, 3),
            "versions": _versions(), **lowering.delegation(),
        },
    )
    artifact.write_metadata()
    return artifact
