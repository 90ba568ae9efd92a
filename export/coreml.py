"""CoreML exporter: an ML Program (.mlpackage) per component and deployment target, fp16 compute by default.

Capture is ``torch.jit.trace`` then ``coremltools.convert(convert_to="mlprogram")``: the traced path is
the one coremltools documents as stable (its torch.export path is still marked beta). Inputs and
outputs keep their declared names and fp32/int32 types; relaydiff metadata goes into the model's
user-defined metadata and descriptions.

CoreML models only run on macOS. Elsewhere :meth:`CoreMLExporter.check_spec` still checks the saved
spec (input/output names, shapes, dtypes, deployment target, metadata) and :meth:`fused_attention_ops`
reports whether iOS18's fused ``scaled_dot_product_attention`` op was used; ``run`` raises
:class:`~relaydiff.export.base.RuntimeUnavailableError`.
"""

from __future__ import annotations

import json
import platform
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

TARGETS = {"iOS17": 8, "iOS18": 9}  # deployment target -> Core ML specification version
_MACOS_FOR_TARGET = {"iOS17": (14, 0), "iOS18": (15, 0)}  # the macOS release that runs the same spec
_PRECISIONS = ("fp16", "fp32")
_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
SDPA_OP = "scaled_dot_product_attention"  # the fused attention op of the iOS18 MIL opset


@register_exporter
@dataclass(frozen=True)
class CoreMLExporter(Exporter):
    """An ML Program for one iOS deployment target."""

    name: ClassVar[str] = "coreml"
    suffix: ClassVar[str] = ".mlpackage"

    target: str = "iOS18"  # minimum deployment target, "iOS17" or "iOS18" (iOS18 adds fused SDPA)
    compute_precision: str = "fp16"  # "fp16" or "fp32": the precision the ML Program computes in
    compute_units: str = "ALL"  # used when running on macOS: ALL, CPU_ONLY, CPU_AND_GPU or CPU_AND_NE

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.compute_precision not in _PRECISIONS:
            raise ValueError(f"compute_precision must be one of {', '.join(_PRECISIONS)}, got {self.compute_precision!r}")
        if self.compute_units not in _UNITS:
            raise ValueError(f"compute_units must be one of {', '.join(_UNITS)}, got {self.compute_units!r}")

    @property
    def precision(self) -> str:
        return self.compute_precision

    def runtime_unavailable_reason(self) -> str | None:
        system = platform.system()
        if system != "Darwin":
            return (
                f"CoreML runtime requires macOS (this machine runs {system}); "
                "coremltools converts and inspects specs here but cannot run them"
            )
        release = tuple(int(p) for p in (platform.mac_ver()[0] or "0").split(".")[:2])
        needed = _MACOS_FOR_TARGET[self.target]
        if release < needed:
            return f"CoreML {self.target} models need macOS {needed[0]}+, this is macOS {platform.mac_ver()[0]}"
        return None

    def _export(
        self, component: Component, model: LoadedModel, signature: Signature, out_dir: Path
    ) -> tuple[dict[str, Path], tuple[str, ...], dict[str, Any]]:
        import coremltools as ct
        import torch

        inputs = component.example_inputs(model)
        args = tuple(torch.from_numpy(inputs[s.name]) for s in signature.inputs)
        stage = "torch.jit.trace"
        try:
            with torch.no_grad():
                traced = torch.jit.trace(component.module(model), args)
            stage = "coremltools.convert"
            mlmodel = ct.convert(
                traced,
                inputs=[ct.TensorType(name=s.name, shape=s.concrete_shape, dtype=np.dtype(s.dtype).type) for s in signature.inputs],
                outputs=[ct.TensorType(name=s.name, dtype=np.dtype(s.dtype).type) for s in signature.outputs],
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16 if self.compute_precision == "fp16" else ct.precision.FLOAT32,
                minimum_deployment_target=getattr(ct.target, self.target),
            )
        except Exception as exc:  # tracing and conversion raise many types; name the stage, keep the message
            raise ExportError(f"CoreML {stage} of {component.name!r} ({self.target}) failed: {type(exc).__name__}: {exc}") from exc
        mlmodel.short_description = component.description
        mlmodel.author = "relaydiff"
        mlmodel.user_defined_metadata.update({
            "relaydiff.component": component.name,
            "relaydiff.family_id": model.family_id,
            "relaydiff.target": self.target,
            "relaydiff.compute_precision": self.compute_precision,
            "relaydiff.signature": json.dumps(signature.to_json()),
        })
        for s in (*signature.inputs, *signature.outputs):
            if s.doc:
                desc = mlmodel.input_description if s in signature.inputs else mlmodel.output_description
                desc[s.name] = s.doc
        path = out_dir / f"{component.name}.{self.target.lower()}{self.suffix}"
        mlmodel.save(str(path))
        ops = mil_op_counts(path)
        return {"mlpackage": path}, ("mlpackage",), {
            "description": component.description,
            "specification_version": TARGETS[self.target],
            "fused_attention_ops": ops.get(SDPA_OP, 0),
            "softmax_ops": ops.get("softmax", 0),
        }

    def fused_attention_ops(self, artifact: Artifact) -> int:
        """How many fused scaled_dot_product_attention ops the saved ML Program holds."""
        return mil_op_counts(artifact.files["mlpackage"]).get(SDPA_OP, 0)

    def _run(self, artifact: Artifact, role: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import coremltools as ct

        mlmodel = ct.models.MLModel(str(artifact.files[role]), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        out = mlmodel.predict(inputs)
        return {s.name: np.asarray(out[s.name]) for s in artifact.signature.outputs if s.name in out}

    def _spec_mismatches(self, artifact: Artifact) -> list[Mismatch]:
        path = artifact.files["mlpackage"]
        if not path.exists():
            return [Mismatch("spec", "", "missing", f"package '{path}'", "nothing")]
        spec = _load_spec(path)
        found_in = [_feature_spec(f) for f in spec.description.input]
        found_out = [_feature_spec(f) for f in spec.description.output]
        out = spec_mismatches("spec", artifact.signature.inputs, found_in, "input")
        out += spec_mismatches("spec", artifact.signature.outputs, found_out, "output")
        if spec.specificationVersion != TARGETS[self.target]:
            out.append(Mismatch("spec", "", "spec", f"specification version {TARGETS[self.target]} ({self.target})",
                                str(spec.specificationVersion)))
        if spec.WhichOneof("Type") != "mlProgram":
            out.append(Mismatch("spec", "", "spec", "an ML Program", str(spec.WhichOneof("Type"))))
        meta = dict(spec.description.metadata.userDefined)
        if meta.get("relaydiff.component") != artifact.component:
            out.append(Mismatch("spec", "", "spec", f"metadata relaydiff.component={artifact.component!r}",
                                repr(meta.get("relaydiff.component"))))
        if TARGETS[self.target] < TARGETS["iOS18"] and mil_op_counts(path).get(SDPA_OP, 0):
            out.append(Mismatch("spec", "", "spec", f"no {SDPA_OP} op before iOS18", "the op is present"))
        return out


def _load_spec(path: Path) -> Any:
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def _feature_spec(feature: Any) -> TensorSpec:
    from coremltools.proto import FeatureTypes_pb2 as ft

    kinds = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16", ft.ArrayFeatureType.INT32: "int32"}
    which = feature.type.WhichOneof("Type")
    if which != "multiArrayType":
        return TensorSpec(feature.name, "float32", (), doc=f"not a multi-array: {which}")
    arr = feature.type.multiArrayType
    dtype = kinds.get(arr.dataType)
    if dtype is None:
        return TensorSpec(feature.name, "float32", tuple(arr.shape), doc=f"unsupported array type {arr.dataType}")
    return TensorSpec(feature.name, dtype, tuple(int(d) for d in arr.shape))


def mil_op_counts(path: Path) -> dict[str, int]:
    """Count the MIL op types in a saved ML Program (walking nested blocks), read from its protobuf spec."""
    spec = _load_spec(path)
    counts: Counter[str] = Counter()

    def walk(block: Any) -> None:
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return dict(counts)
