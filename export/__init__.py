"""relaydiff.export: export the device half (UNet step, VAE decoder, text encoder) to ONNX, CoreML and ExecuTorch.

Components declare what is exported (``relaydiff.export.components``); exporters turn a component of a
loaded family into files and validate them against torch (``relaydiff.export.base``)::

    from relaydiff.core import family
    from relaydiff.export import get_component, get_exporter

    model = family.load(family.resolve(folder, role="device"))
    exporter = get_exporter("onnx")
    artifact = exporter.export(get_component("unet_step"), model, "out/onnx")
    report = exporter.validate(artifact, model)  # raises ValidationError listing every mismatch

Importing this package registers every component and exporter; the heavy libraries (torch, onnx,
coremltools, executorch) are imported only when something is exported or run.
"""

from relaydiff.export import coreml as _coreml  # noqa: F401  (registers "coreml")
from relaydiff.export import executorch as _executorch  # noqa: F401  (registers "executorch")
from relaydiff.export import onnx as _onnx  # noqa: F401  (registers "onnx")
from relaydiff.export.base import (
    Artifact,
    ExportError,
    Exporter,
    InputSpecError,
    Mismatch,
    RuntimeUnavailableError,
    Signature,
    TensorSpec,
    Tolerance,
    UnknownNameError,
    ValidationError,
    ValidationReport,
    check_inputs,
    get_exporter,
    list_exporters,
    register_exporter,
)
from relaydiff.export.components import Component, get_component, list_components, register_component

__all__ = [
    "Artifact",
    "Component",
    "ExportError",
    "Exporter",
    "InputSpecError",
    "Mismatch",
    "RuntimeUnavailableError",
    "Signature",
    "TensorSpec",
    "Tolerance",
    "UnknownNameError",
    "ValidationError",
    "ValidationReport",
    "check_inputs",
    "get_component",
    "get_exporter",
    "list_components",
    "list_exporters",
    "register_component",
    "register_exporter",
]
