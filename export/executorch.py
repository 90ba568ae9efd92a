"""ExecuTorch exporter: the explicit lowering chain to a .pte with the XNNPACK delegate.

``torch.export.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` ->
``to_executorch()`` -> write the buffer. Each stage is kept in :class:`Lowering` so it can be
inspected (and so that a quantization stage, prepare -> calibrate -> convert, can slot in between
capture and lowering later). The .pte is validated with ExecuTorch's Python runtime
(``executorch.runtime.Runtime``), which ships in the executorch wheel for Linux and macOS.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from relaydiff.export.base import (
    Artifact,
    ExportError,
    Exporter,
    Mismatch,
    Signature,
    TensorSpec,
    register_exporter,
    spec_mismatches,
)

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel
    from relaydiff.export.components import Component

# ExecuTorch ScalarType codes (c10 numbering) of the dtypes components declare
_ET_DTYPES = {6: "float32", 5: "float16", 3: "int32", 4: "int64"}
_BACKENDS = ("xnnpack", "portable")


@dataclass
class Lowering:
    """The stages of one lowering, kept for inspection."""

    exported: Any  # torch.export.ExportedProgram (ATen dialect)
    edge: Any  # executorch.exir.EdgeProgramManager after partitioning and lowering
    program: Any  # executorch.exir.ExecutorchProgramManager (holds .buffer, the .pte bytes)

    def delegation(self) -> dict[str, Any]:
        """How much of the graph the backend took: delegate calls and the ops left to portable kernels."""
        graph = self.edge.exported_program().graph
        left: Counter[str] = Counter()
        delegates = 0
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            target = str(getattr(node.target, "__name__", node.target))
            if "executorch_call_delegate" in target:
                delegates += 1
            elif target not in ("getitem", "alloc"):  # alloc: memory planning, not an op
                left[target] += 1
        # a list of records (not a mapping keyed by op name, nor a repr): every value is plain JSON a reader can iterate
        return {"delegate_calls": delegates, "ops_outside_delegates": [{"op": op, "count": n} for op, n in sorted(left.items())]}


@register_exporter
@dataclass(frozen=True)
class ExecuTorchExporter(Exporter):
    """A .pte program for the ExecuTorch runtime (fp32, XNNPACK delegate by default)."""

    name: ClassVar[str] = "executorch"
    suffix: ClassVar[str] = ".pte"

    backend: str = "xnnpack"  # "xnnpack": XNNPACK delegate for what it supports; "portable": no delegate
    strict: bool = False  # torch.export strict mode (non-strict traces diffusers' Python control flow fine)

    def __post_init__(self) -> None:
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False, got {self.strict!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}")

    def lower(self, component: Component, model: LoadedModel) -> Lowering:
        """Run the lowering chain on ``component`` of ``model`` and return every stage.

        Raises:
            ExportError: a stage failed (the message names the stage and quotes the error).
        """
        import torch
        from executorch.exir import to_edge_transform_and_lower

        signature = component.signature(model)
        inputs = component.example_inputs(model)
        args = tuple(torch.from_numpy(inputs[s.name]) for s in signature.inputs)
        stage = "torch.export.export"
        try:
            with torch.no_grad():
                exported = torch.export.export(component.module(model), args, strict=self.strict)
            stage = "to_edge_transform_and_lower"
            edge = to_edge_transform_and_lower(exported, partitioner=self._partitioners())
            stage = "to_executorch"
            program = edge.to_executorch()
        except Exception as exc:  # each stage raises its own types; name the stage and keep the message
            raise ExportError(f"ExecuTorch {stage} of {component.name!r} failed: {type(exc).__name__}: {exc}") from exc
        return Lowering(exported, edge, program)

    def _partitioners(self) -> list[Any]:
        if self.backend == "portable":
            return []
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]

    def _export(
        self, component: Component, model: LoadedModel, signature: Signature, out_dir: Path
    ) -> tuple[dict[str, Path], tuple[str, ...], dict[str, Any]]:
        lowering = self.lower(component, model)
        path = out_dir / f"{component.name}{self.suffix}"
        path.write_bytes(lowering.program.buffer)
        return {"pte": path}, ("pte",), {"description": component.description, **lowering.delegation()}

    def _run(self, artifact: Artifact, role: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        method = _load_method(artifact.files[role])
        args = [torch.from_numpy(inputs[s.name]) for s in artifact.signature.inputs]
        outs = method.execute(args)
        names = [s.name for s in artifact.signature.outputs]
        if len(outs) != len(names):
            raise ExportError(f"'{artifact.files[role]}' returned {len(outs)} outputs; {len(names)} are declared")
        return {n: o.detach().numpy().copy() for n, o in zip(names, outs, strict=True)}

    def _spec_mismatches(self, artifact: Artifact) -> list[Mismatch]:
        path = artifact.files["pte"]
        if not path.is_file():
            return [Mismatch("pte", "", "missing", f"file '{path}'", "no file")]
        meta = _load_method(path).metadata
        # a .pte has no tensor names: inputs and outputs are positional, so declared names are paired by order
        found_in = [_et_spec(s.name, meta.input_tensor_meta(i)) for i, s in enumerate(artifact.signature.inputs[: meta.num_inputs()])]
        found_out = [_et_spec(s.name, meta.output_tensor_meta(i)) for i, s in enumerate(artifact.signature.outputs[: meta.num_outputs()])]
        out = spec_mismatches("pte", artifact.signature.inputs, found_in, "input")
        out += spec_mismatches("pte", artifact.signature.outputs, found_out, "output")
        for side, n, declared in (("inputs", meta.num_inputs(), artifact.signature.inputs),
                                  ("outputs", meta.num_outputs(), artifact.signature.outputs)):
            if n != len(declared):
                out.append(Mismatch("pte", "", "spec", f"{len(declared)} {side}", f"{n} {side}"))
        return out


def _load_method(path: Path) -> Any:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    return program.load_method("forward")


def _et_spec(name: str, info: Any) -> TensorSpec:
    code = int(info.dtype())
    dtype = _ET_DTYPES.get(code)
    if dtype is None:
        return TensorSpec(name, "float32", tuple(info.sizes()), doc=f"unsupported ExecuTorch dtype code {code}")
    return TensorSpec(name, dtype, tuple(int(d) for d in info.sizes()))
