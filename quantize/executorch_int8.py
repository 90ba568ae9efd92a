"""INT8 ExecuTorch: PT2E quantization with the XNNPACK quantizer, calibrated on recorded inputs, then lowered to XNNPACK.

The chain, each stage kept (:class:`~relaydiff.export.executorch.Lowering` plus the quantized module):

``torch.export.export(...).module()`` -> ``prepare_pt2e(m, XNNPACKQuantizer)`` -> run the calibration
inputs -> ``convert_pt2e`` -> ``torch.export.export`` -> ``to_edge_transform_and_lower(XnnpackPartitioner)``
-> ``to_executorch()``. ``prepare_pt2e``/``convert_pt2e`` come from torchao 0.18
(``torchao.quantization.pt2e.quantize_pt2e``); the quantizer is ExecuTorch 1.5.1's
``XNNPACKQuantizer`` with its symmetric per-channel int8 config (static activations).

**Mixed precision.** XNNPACK has no 16-bit activation kernels, so the W8A16 scheme that rescues the ONNX
UNet is not available here. A sensitivity probe on the trained teacher (one module left in float at a
time, docs/bundle.md) found one place where 8-bit activations break the denoiser: the last, full-resolution
up block and the output head. At the last device step (t = 1) the noise left in the latent is about 4% of
its range, below the resolution of an 8-bit activation of the whole latent, and the denoiser's output falls
to 7 dB PSNR; with those modules in float it is 12.9 dB and the relayed image rises from 31 to 34 dB.
So by default the nodes of :data:`DEFAULT_FLOAT_MODULES` keep their float ops (their annotations are
removed after the XNNPACK quantizer annotates the graph, see :class:`_FloatModules`); ``float_modules=()``
quantizes everything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaydiff.core.metrics import Tolerance
from relaydiff.export.base import Artifact, ExportError, tool_versions
from relaydiff.export.executorch import Lowering
from relaydiff.quantize.calibration import Inputs
from relaydiff.quantize.onnx_int8 import INT8_TOLERANCES

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel
    from relaydiff.export.components import Component


# Module paths (as in torch.export's nn_module_stack, relative to the exported wrapper) left in float by default;
# a negative index counts from the end of its ModuleList ("unet.up_blocks.-1" is the last up block).
DEFAULT_FLOAT_MODULES: tuple[str, ...] = ("unet.up_blocks.-1", "unet.conv_norm_out", "unet.conv_out")


@dataclass(frozen=True)
class ExecuTorchInt8Config:
    """Options of one PT2E quantization."""

    per_channel: bool = True  # per-output-channel weight scales
    max_calibration: int = 1024  # at most this many calibration inputs (spread over the set) go through the observers
    float_modules: tuple[str, ...] = DEFAULT_FLOAT_MODULES  # modules whose ops stay float (unmatched names are ignored)


def resolve_module_paths(root: Any, paths: Sequence[str]) -> list[str]:
    """``paths`` with negative ModuleList indices made absolute against ``root``; paths that name no submodule are dropped."""
    names = {n for n, _ in root.named_modules()}
    out = []
    for path in paths:
        parts = path.split(".")
        mod, resolved = root, []
        for part in parts:
            if part.lstrip("-").isdigit() and hasattr(mod, "__len__"):
                i = int(part)
                if not -len(mod) <= i < len(mod):
                    break
                part = str(i % len(mod))
            mod = getattr(mod, part, None) if not part.isdigit() else mod[int(part)]
            resolved.append(part)
            if mod is None:
                break
        else:
            name = ".".join(resolved)
            if name in names:
                out.append(name)
    return out


def _float_modules_quantizer(inner: Any, modules: Sequence[str]) -> Any:
    """``inner`` (an XNNPACKQuantizer) whose annotations are removed from every node inside one of ``modules``.

    Written here because ExecuTorch 1.5.1's ``set_module_name(name, None)`` refuses a None config. A node whose
    annotation shares a quantization spec with a removed node is cleared too (to a fixed point), or
    ``prepare_pt2e`` would look up an observer that was never made.
    """
    from torchao.quantization.pt2e.quantizer import Quantizer, SharedQuantizationSpec

    def inside(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(path == m or path.startswith(m + ".") for path, _type in stack.values() for m in modules)

    def refs(ann: Any) -> list[Any]:
        specs = list(ann.input_qspec_map.values()) + [ann.output_qspec]
        found: list[Any] = []
        for spec in specs:
            if isinstance(spec, SharedQuantizationSpec):
                e = spec.edge_or_node
                found.extend(e if isinstance(e, tuple) else (e,))
        return found

    class FloatModules(Quantizer):
        stripped = 0

        def transform_for_annotation(self, model: Any) -> Any:
            return inner.transform_for_annotation(model)

        def annotate(self, model: Any) -> Any:
            model = inner.annotate(model)
            cleared = set()
            for node in model.graph.nodes:
                if "quantization_annotation" in node.meta and inside(node):
                    del node.meta["quantization_annotation"]
                    cleared.add(node)
            changed = bool(cleared)
            while changed:
                changed = False
                for node in model.graph.nodes:
                    ann = node.meta.get("quantization_annotation")
                    if ann is not None and any(r in cleared for r in refs(ann)):
                        del node.meta["quantization_annotation"]
                        cleared.add(node)
                        changed = True
            FloatModules.stripped = len(cleared)
            return model

        def validate(self, model: Any) -> None:
            inner.validate(model)

    return FloatModules()


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced over the whole sequence (not its first ``n``: those are the first
    prompts' relays only)."""
    if n < 1:
        raise ValueError(f"max_calibration must be >= 1, got {n!r}")
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def quantize_pt2e(component: Component, model: LoadedModel, calibration: Sequence[Inputs],
                  config: ExecuTorchInt8Config | None = None) -> Any:
    """``component`` captured, annotated by the XNNPACK quantizer (minus ``config.float_modules``), calibrated on
    ``calibration`` and converted: a torch module with quantize/dequantize ops, runnable as is (simulated INT8).

    Raises:
        ValueError: ``calibration`` is empty.
        ExportError: a stage failed (named, error quoted).
    """
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = config or ExecuTorchInt8Config()
    if not calibration:
        raise ValueError("PT2E quantization needs at least one calibration input")
    signature = component.signature(model)
    stage = "torch.export.export"
    try:
        with torch.no_grad():
            root = component.module(model)
            captured = torch.export.export(root, _args(signature, calibration[0]), strict=False).module()
            stage = "prepare_pt2e"
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=config.per_channel))
            float_modules = resolve_module_paths(root, config.float_modules)
            if float_modules:
                quantizer = _float_modules_quantizer(quantizer, float_modules)
            prepared = prepare_pt2e(captured, quantizer)
            stage = "calibration"
            for x in spread(calibration, config.max_calibration):
                prepared(*_args(signature, x))
            stage = "convert_pt2e"
            return convert_pt2e(prepared)
    except Exception as exc:  # each stage raises its own types; name the stage and keep the message
        raise ExportError(f"ExecuTorch INT8 {stage} of {component.name!r} failed: {type(exc).__name__}: {exc}") from exc


def quantize_lower(component: Component, model: LoadedModel, calibration: Sequence[Inputs],
                   config: ExecuTorchInt8Config | None = None) -> tuple[Any, Lowering]:
    """Quantize ``component`` with :func:`quantize_pt2e` and lower it; return (quantized module, every lowering stage).

    Raises:
        ValueError: ``calibration`` is empty.
        ExportError: a stage failed (named, error quoted).
    """
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    quantized = quantize_pt2e(component, model, calibration, config)
    signature = component.signature(model)
    stage = "torch.export.export (quantized)"
    try:
        with torch.no_grad():
            exported = torch.export.export(quantized, _args(signature, calibration[0]), strict=False)
        stage = "to_edge_transform_and_lower"
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        stage = "to_executorch"
        program = edge.to_executorch()
    except Exception as exc:  # each stage raises its own types; name the stage and keep the message
        raise ExportError(f"ExecuTorch INT8 {stage} of {component.name!r} failed: {type(exc).__name__}: {exc}") from exc
    return quantized, Lowering(exported, edge, program)


def _args(signature: Any, x: Inputs) -> tuple[Any, ...]:
    """The declared inputs of ``x`` as torch tensors, in call order."""
    import torch

    return tuple(torch.from_numpy(x[s.name]) for s in signature.inputs)


def export_int8(component: Component, model: LoadedModel, calibration: Sequence[Inputs], out_dir: str | Path,
                config: ExecuTorchInt8Config | None = None, calibration_summary: dict[str, Any] | None = None) -> Artifact:
    """Write ``<component>.int8.pte`` and its metadata JSON; return the artifact (run it with the ``executorch`` exporter)."""
    config = config or ExecuTorchInt8Config()
    t0 = time.perf_counter()
    _, lowering = quantize_lower(component, model, calibration, config)
    root = component.module(model)
    float_modules = resolve_module_paths(root, config.float_modules)
    float_params = sum(p.numel() for n in float_modules for p in root.get_submodule(n).parameters())
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
                             "max_calibration": config.max_calibration, "float_modules": float_modules,
                             "float_parameters": float_params, "parameters": sum(p.numel() for p in root.parameters())},
            "calibration": calibration_summary, "export_seconds": round(time.perf_counter() - t0, 3),
            "versions": tool_versions(), **lowering.delegation(),
        },
    )
    artifact.write_metadata()
    return artifact
