"""Run one exported artifact file in its runtime: onnxruntime (``.onnx``, ``.ort``), ExecuTorch (``.pte``), CoreML.

This is the one place relaydiff runs an artifact: the device backends, bundle verification, the
export benchmarks, quantization parity and the conformance tests all call :class:`ArtifactSession`.
The runtimes are imported only when a session is opened.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError

Arrays = Mapping[str, np.ndarray]
Runner = Callable[[Arrays], dict[str, np.ndarray]]  # inputs by declared name -> outputs by declared name
MACOS_ONLY = "skipped: runtime needs macOS"
RUNTIME_MODULES = {"onnx": "onnxruntime", "executorch": "executorch.runtime", "coreml": "coremltools"}


class RuntimeUnavailableError(RelaydiffError):
    """The runtime of an artifact cannot run on this machine (e.g. CoreML off macOS)."""


def runtime_unavailable(target: str) -> str | None:
    """Why this machine cannot run ``target`` artifacts ("skipped: ..."), or None when it can."""
    if target == "coreml" and sys.platform != "darwin":
        return MACOS_ONLY
    module = RUNTIME_MODULES.get(target)
    if module is None:
        return f"skipped: unknown target {target!r}"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"skipped: {module} is not installed ({exc})"
    return None


class ArtifactSession:
    """One artifact file loaded into its runtime; call it with inputs by declared name, get outputs by declared name.

    Raises (on construction):
        RuntimeUnavailableError: the target's runtime does not exist on this machine.
    """

    def __init__(self, path: Path, target: str, inputs: Sequence[str], outputs: Sequence[str], *, threads: int = 1) -> None:
        reason = runtime_unavailable(target)
        if reason is not None:
            raise RuntimeUnavailableError(f"{path.name}: {reason}")
        self.path = path
        self.target = target
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        t0 = time.perf_counter()
        if target == "onnx":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self._call: Callable[[Arrays], list[Any]] = self._run_onnx
        elif target == "executorch":
            from executorch.runtime import Runtime

            self._method = Runtime.get().load_program(path).load_method("forward")
            self._call = self._run_executorch
        else:
            import coremltools as ct

            self._model = ct.models.MLModel(str(path))
            self._call = self._run_coreml
        self.load_seconds = time.perf_counter() - t0

    def __call__(self, inputs: Arrays) -> dict[str, np.ndarray]:
        outs = self._call(inputs)
        if len(outs) != len(self.outputs):
            raise RelaydiffError(f"{self.path.name} returned {len(outs)} outputs; the manifest declares {len(self.outputs)}")
        return dict(zip(self.outputs, outs, strict=True))

    def _run_onnx(self, inputs: Arrays) -> list[Any]:
        return list(self._session.run(self.outputs, {n: np.ascontiguousarray(inputs[n]) for n in self.inputs}))

    def _run_executorch(self, inputs: Arrays) -> list[Any]:
        import torch

        outs = self._method.execute([torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.inputs])
        return [o.detach().numpy().copy() for o in outs]

    def _run_coreml(self, inputs: Arrays) -> list[Any]:
        out = self._model.predict({n: np.ascontiguousarray(inputs[n]) for n in self.inputs})
        return [np.asarray(out[n]) for n in self.outputs]
