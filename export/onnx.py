"""ONNX exporter: a fixed-shape .onnx, an onnxruntime-optimised copy and the ORT Mobile (.ort) file.

Capture:
- a component that declares an :class:`~relaydiff.export.components.OptimumSource` (a plain module
  optimum knows, e.g. the CLIP text encoder) is exported by ``optimum.exporters.onnx.export`` with
  fixed shapes and checked by optimum's own ``validate_model_outputs``; outputs that are not declared
  (CLIP's ``pooler_output``) are cut off with ``onnx.utils.Extractor``;
- the others (our wrappers with CFG or VAE scaling inside) go through ``torch.onnx.export(dynamo=True)``,
  the torch.export-based exporter, i.e. the same graph capture ExecuTorch uses.

Then onnxruntime writes its optimised model (``SessionOptions.optimized_model_filepath``) and its
converter (``onnxruntime.tools.convert_onnx_models_to_ort``) writes the .ort file and the operator list
a reduced ORT Mobile build needs. All three model files are validated against torch.
"""

from __future__ import annotations

import contextlib
import io
import json
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

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(int64)": "int64"}
_LEVELS = ("basic", "extended", "all")


@register_exporter
@dataclass(frozen=True)
class OnnxExporter(Exporter):
    """Fixed-shape ONNX for onnxruntime (desktop and ORT Mobile)."""

    name: ClassVar[str] = "onnx"
    suffix: ClassVar[str] = ".onnx"

    opset: int = 18  # ONNX opset of the exported graph
    optimization: str = "extended"  # ORT level of the saved optimised model: "basic", "extended" or "all"
    write_ort: bool = True  # also write the ORT Mobile format (.ort) and its required-operators config
    use_optimum: bool = True  # export components that declare an optimum source with optimum.exporters.onnx

    def __post_init__(self) -> None:
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 18:
            raise ValueError(f"opset must be an integer >= 18 (the dynamo exporter's floor), got {self.opset!r}")
        for flag in ("write_ort", "use_optimum"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.optimization not in _LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(_LEVELS)}, got {self.optimization!r}")

    def _export(
        self, component: Component, model: LoadedModel, signature: Signature, out_dir: Path
    ) -> tuple[dict[str, Path], tuple[str, ...], dict[str, Any]]:
        import onnxruntime as ort

        path = out_dir / f"{component.name}{self.suffix}"
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        exported_with = self._capture(component, model, signature, path)
        self._annotate(path, component, model, signature, exported_with)

        files = {"onnx": path}
        optimized = out_dir / f"{component.name}.optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        so.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        files["optimized"] = optimized
        if self.write_ort:
            files.update(convert_to_ort(path))
        runnable = tuple(r for r in ("onnx", "optimized", "ort") if r in files)
        return files, runnable, {"exported_with": exported_with, "description": component.description}

    def _capture(self, component: Component, model: LoadedModel, signature: Signature, path: Path) -> str:
        """Write the plain .onnx; return a one-line note of which exporter wrote it."""
        skipped = ""
        if self.use_optimum and component.optimum is not None:
            note = _export_with_optimum(component, model, signature, path, self.opset)
            if not note.startswith("skipped"):
                return note
            skipped = f"; optimum {note}"
        import torch

        inputs = component.example_inputs(model)
        args = tuple(torch.from_numpy(inputs[s.name]) for s in signature.inputs)
        try:
            torch.onnx.export(
                component.module(model), args, str(path), dynamo=True, external_data=False,
                input_names=[s.name for s in signature.inputs], output_names=[s.name for s in signature.outputs],
                opset_version=self.opset, optimize=True,
            )
        except Exception as exc:  # the exporter raises many types; keep its message for the user
            raise ExportError(f"torch.onnx.export of {component.name!r} failed: {type(exc).__name__}: {exc}") from exc
        return f"torch.onnx.export(dynamo=True, opset={self.opset}){skipped}"

    @staticmethod
    def _annotate(path: Path, component: Component, model: LoadedModel, signature: Signature, exported_with: str) -> None:
        """Write relaydiff metadata into the ONNX file and check the model."""
        import onnx

        proto = onnx.load(str(path))
        props = {
            "relaydiff.component": component.name,
            "relaydiff.family_id": model.family_id,
            "relaydiff.signature": json.dumps(signature.to_json()),
            "relaydiff.tolerance.fp32": json.dumps(component.tolerance("fp32").to_json()),
            "relaydiff.exported_with": exported_with,
        }
        del proto.metadata_props[:]
        strip_node_metadata(proto)
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = component.description
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(path))

    def _run(self, artifact: Artifact, role: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = _session(artifact.files[role])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs), strict=True))

    def _spec_mismatches(self, artifact: Artifact) -> list[Mismatch]:
        out: list[Mismatch] = []
        for role in artifact.runnable:
            path = artifact.files[role]
            if not path.is_file():
                out.append(Mismatch(role, "", "missing", f"file '{path}'", "no file"))
                continue
            session = _session(path)
            found_in = [_ort_spec(a) for a in session.get_inputs()]
            found_out = [_ort_spec(a) for a in session.get_outputs()]
            out += spec_mismatches(role, artifact.signature.inputs, found_in, "input")
            out += spec_mismatches(role, artifact.signature.outputs, found_out, "output")
        return out


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:  # a type no component declares: report it as the spec mismatch it is
        return TensorSpec(arg.name, "float32", tuple(arg.shape), doc=f"unsupported ONNX type {arg.type}")
    return TensorSpec(arg.name, dtype, tuple(d if isinstance(d, int) else str(d) for d in arg.shape))


def convert_to_ort(path: Path) -> dict[str, Path]:
    """Run onnxruntime's ORT-format converter on one .onnx file; return the .ort and its operator config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the converter prints progress for the command line
            convert_onnx_models_to_ort(path, output_dir=path.parent, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:  # the converter re-raises whatever onnxruntime raised
        raise ExportError(f"ORT format conversion of '{path}' failed: {exc}\n{log.getvalue()}") from exc
    ort_path = path.with_suffix(".ort")
    config = path.with_suffix(".required_operators.config")
    if not ort_path.is_file():
        raise ExportError(f"the ORT converter wrote no '{ort_path}':\n{log.getvalue()}")
    if config.is_file():  # its header names the source models by absolute path: keep the file name only
        text = config.read_text()
        for folder in {str(path.parent.resolve()), str(path.parent.absolute()), str(path.parent)}:
            text = text.replace(folder.rstrip("/") + "/", "")
        config.write_text(text)
    return {"ort": ort_path, "ort_config": config}


def _export_with_optimum(component: Component, model: LoadedModel, signature: Signature, path: Path, opset: int) -> str:
    """Export a plain module with optimum.exporters.onnx (fixed shapes) and optimum's own validation.

    Returns a note of what was done, starting with "skipped" when optimum has no ONNX config for the
    module's class (the caller then exports with torch.onnx and records the note).
    """
    import onnx
    from optimum.exporters.onnx import export as optimum_export
    from optimum.exporters.onnx import validate_model_outputs
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import _get_diffusers_submodel_type  # pinned optimum-onnx; no public equivalent

    src = component.optimum
    assert src is not None
    module = getattr(model, src.submodel)
    # optimum names diffusers submodels by class ("CLIPTextModel" -> "clip-text"), as its pipeline export does
    model_type = _get_diffusers_submodel_type(module) if src.library == "diffusers" else None
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=module, model_type=model_type, task=src.task, library_name=src.library
        )
    except (KeyError, ValueError) as exc:  # optimum does not know this class or task: the torch path exports it
        return f"skipped: {exc}"
    dims = component.dims(model)
    shapes = {k: (dims[v] if isinstance(v, str) else int(v)) for k, v in src.shapes.items()}
    int_dtype = next((s.dtype for s in signature.inputs if s.dtype.startswith("int")), "int64")
    config = constructor(module.config, int_dtype=int_dtype, float_dtype="fp32")
    try:
        _, names = optimum_export(model=module, config=config, output=path, opset=opset, input_shapes=shapes, no_dynamic_axes=True)
        tol = component.tolerance("fp32").max_abs
        validate_model_outputs(config, module, path, names, atol=tol, input_shapes=shapes, use_subprocess=False)
    except Exception as exc:  # optimum raises ValueError subclasses and whatever torch.onnx raised
        raise ExportError(f"optimum.exporters.onnx failed on {component.name!r}: {type(exc).__name__}: {exc}") from exc
    declared = [s.name for s in signature.outputs]
    if names != declared:  # cut off outputs we do not declare (e.g. CLIP's pooler_output)
        proto = onnx.utils.Extractor(onnx.load(str(path))).extract_model([s.name for s in signature.inputs], declared)
        onnx.save(proto, str(path))
    return f"optimum.exporters.onnx.export ({type(config).__name__}, opset={opset}, fixed shapes) + its validate_model_outputs"


def strip_node_metadata(proto: Any) -> None:
    """Drop per-node debugging metadata (the dynamo exporter's stack traces and module paths; about 40% of a small
    UNet's file) and doc strings, in the graph and in its functions; the computation is untouched."""
    graphs = [proto.graph]
    nodes = []
    while graphs:
        g = graphs.pop()
        for node in g.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    for fn in proto.functions:
        nodes.extend(fn.node)
        del fn.metadata_props[:]
    for node in nodes:
        del node.metadata_props[:]
        node.doc_string = ""
