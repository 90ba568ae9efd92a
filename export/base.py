"""What every exporter shares: tensor specs, tolerances, artifacts, the checks, the errors and the name registry.

The pattern is optimum's "declare, then validate": a component declares its inputs, outputs and
tolerances (``relaydiff.export.components``); an exporter turns it into files (an :class:`Artifact`)
and then runs the files against the torch reference, collecting every mismatch before raising one
typed :class:`ValidationError`. Before any run, the declared inputs are checked by name, dtype and
shape (as apple/ml-stable-diffusion's runtime does). Nothing heavy is imported here.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.metrics import Tolerance, compare
from relaydiff.runtime.sessions import RuntimeUnavailableError

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel
    from relaydiff.export.components import Component

ARTIFACT_FORMAT = "relaydiff-artifact/1"
DTYPES = ("float32", "float16", "int32", "int64")  # the tensor dtypes a spec may declare
PRECISIONS = ("fp32", "fp16", "int8")  # the compute precisions a tolerance may be declared for

Arrays = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------------------------- errors


class ExportError(RelaydiffError):
    """An export or a conversion could not be done."""


class UnknownNameError(RelaydiffError, LookupError):
    """A component or exporter name that is not registered."""


class InputSpecError(RelaydiffError, TypeError):
    """Inputs handed to an exported model do not match its declared inputs (names, dtypes, shapes)."""


@dataclass(frozen=True)
class Mismatch:
    """One way an artifact differs from what was declared or from the torch reference."""

    where: str  # the artifact file role that was checked, e.g. "onnx", "ort", "pte", "spec"
    tensor: str  # the input/output name, or "" for artifact-wide facts (deployment target)
    kind: str  # "missing", "unexpected", "shape", "dtype", "non-finite", "tolerance", "spec"
    expected: str  # what was declared or what the reference gave
    got: str  # what the artifact gave

    def __str__(self) -> str:
        name = f" {self.tensor}" if self.tensor else ""
        return f"[{self.where}]{name}: {self.kind}: expected {self.expected}, got {self.got}"


class ValidationError(RelaydiffError):
    """An artifact failed validation; ``mismatches`` holds every problem found, not only the first."""

    def __init__(self, artifact: str, mismatches: Sequence[Mismatch]) -> None:
        self.artifact = artifact
        self.mismatches = tuple(mismatches)
        lines = "\n".join(f"  - {m}" for m in self.mismatches)
        super().__init__(f"{artifact} failed validation ({len(self.mismatches)} mismatch(es)):\n{lines}")


# ------------------------------------------------------------------------------------------- registries

T = TypeVar("T")


class Registry(Generic[T]):
    """Things registered by name; looking up an unknown name fails with the list of known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "component" or "exporter", used in error messages
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# ---------------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output. Dimensions are ints, or names a component resolves from the family."""

    name: str  # the tensor's name in every exported format
    dtype: str  # one of DTYPES
    shape: tuple[int | str, ...]  # e.g. (1, "C", "h", "w"); names are filled by Component.dims(model)
    doc: str = ""  # one line for artifact metadata (CoreML input descriptions)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def resolve(self, dims: Mapping[str, int]) -> TensorSpec:
        """The same spec with every named dimension replaced by its value in ``dims``."""
        shape = []
        for d in self.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ValueError(f"tensor {self.name!r}: dimension {d!r} is not in {sorted(dims)}")
                d = dims[d]
            shape.append(int(d))
        return dataclasses.replace(self, shape=tuple(shape))

    @property
    def concrete_shape(self) -> tuple[int, ...]:
        if any(isinstance(d, str) for d in self.shape):
            raise ValueError(f"tensor {self.name!r} has unresolved dimensions {self.shape}")
        return tuple(int(d) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]), str(data.get("doc", "")))


@dataclass(frozen=True)
class Signature:
    """The concrete (fixed-shape) inputs and outputs of one component for one family."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            tuple(TensorSpec.from_json(s) for s in data["outputs"]),
        )


# --------------------------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifact:
    """What one exporter made from one component: its files, declared signature and metadata.

    ``files`` maps a role to a path; every role in ``runnable`` is a complete model in its own
    right (e.g. the ONNX file, its ORT-optimised copy and the .ort file) and is validated.
    The metadata is also written beside the files as JSON (``<stem>.json``), so a folder alone
    says what each file is.
    """

    exporter: str  # registry name of the exporter that made it
    component: str  # registry name of the component
    signature: Signature  # the fixed-shape inputs/outputs every runnable file must have
    files: dict[str, Path]  # role -> path
    runnable: tuple[str, ...]  # roles of files that are complete models, first = the primary one
    precision: str  # "fp32" / "fp16" / "int8": picks the component's tolerance
    tolerance: Tolerance  # the bar the runnable files are held to
    metadata: dict[str, Any] = field(default_factory=dict)  # exporter options, family id, timings, versions

    @property
    def path(self) -> Path:
        """The primary file."""
        return self.files[self.runnable[0]]

    @property
    def label(self) -> str:
        return f"{self.exporter} artifact of {self.component} ({self.path.name})"

    @property
    def metadata_path(self) -> Path:
        return self.path.parent / f"{self.path.name}.json"

    def to_json(self) -> dict[str, Any]:
        root = self.path.parent
        return {
            "format": ARTIFACT_FORMAT,
            "exporter": self.exporter,
            "component": self.component,
            "signature": self.signature.to_json(),
            "files": {k: str(v.relative_to(root)) if v.is_relative_to(root) else str(v) for k, v in self.files.items()},
            "runnable": list(self.runnable),
            "precision": self.precision,
            "tolerance": self.tolerance.to_json(),
            "metadata": self.metadata,
        }

    def write_metadata(self) -> Path:
        """Write the metadata JSON beside the primary file and return its path.

        The family folder (``metadata["family_root"]``) is written relative to the JSON file's folder, so a
        file never records an absolute path of the machine that built it. Every value must be JSON already.

        Raises:
            TypeError / ValueError: a metadata value is not JSON, or not finite (nothing is stringified silently).
        """
        data = self.to_json()
        root = data["metadata"].get("family_root")
        if root is not None:
            data["metadata"]["family_root"] = _relative(Path(root), self.metadata_path.parent)
        self.metadata_path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
        return self.metadata_path

    @classmethod
    def read(cls, path: str | Path) -> Artifact:
        """Read an artifact back from its metadata JSON.

        Raises:
            ExportError: the file is not an artifact description.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportError(f"cannot read artifact metadata '{path}': {exc}") from None
        if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
            raise ExportError(f"'{path}' is not a {ARTIFACT_FORMAT} file")
        root = path.parent
        return cls(
            exporter=data["exporter"],
            component=data["component"],
            signature=Signature.from_json(data["signature"]),
            files={k: root / v for k, v in data["files"].items()},
            runnable=tuple(data["runnable"]),
            precision=data["precision"],
            tolerance=Tolerance(**data["tolerance"]),
            metadata=dict(data.get("metadata", {})),
        )


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` ("/"-separated), resolving both first."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


@dataclass(frozen=True)
class OutputCheck:
    """How one output of one runnable file compared with the reference."""

    where: str  # file role
    output: str  # output name
    max_abs_error: float
    psnr_db: float
    passed: bool


@dataclass(frozen=True)
class ValidationReport:
    """The numbers behind a passed validation (a failed one raises ValidationError instead)."""

    artifact: str
    tolerance: Tolerance
    checks: tuple[OutputCheck, ...]

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    def __str__(self) -> str:
        rows = ", ".join(f"{c.where}/{c.output}: max abs {c.max_abs_error:.3g}, PSNR {c.psnr_db:.1f} dB" for c in self.checks)
        return f"{self.artifact}: {rows} (bar: {self.tolerance.describe()})"


# ------------------------------------------------------------------------------------------------- checks


def check_inputs(signature: Signature, inputs: Arrays) -> dict[str, np.ndarray]:
    """Check ``inputs`` against the declared inputs (names, dtypes, shapes); return them as contiguous arrays.

    Raises:
        InputSpecError: naming every missing, unexpected or ill-typed input and what is accepted.
    """
    problems = []
    declared = {s.name: s for s in signature.inputs}
    for name in inputs:
        if name not in declared:
            problems.append(f"unexpected input {name!r}")
    out = {}
    for name, spec in declared.items():
        if name not in inputs:
            problems.append(f"missing input {name!r}")
            continue
        arr = np.asarray(inputs[name])
        if str(arr.dtype) != spec.dtype:
            problems.append(f"input {name!r} has dtype {arr.dtype}, expected {spec.dtype}")
        if tuple(arr.shape) != spec.concrete_shape:
            problems.append(f"input {name!r} has shape {tuple(arr.shape)}, expected {spec.concrete_shape}")
        out[name] = np.ascontiguousarray(arr)
    if problems:
        accepted = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in signature.inputs)
        raise InputSpecError(f"{'; '.join(problems)} (the model accepts {accepted})")
    return out


def compare_outputs(
    where: str, signature: Signature, got: Arrays, reference: Arrays, tolerance: Tolerance
) -> tuple[list[OutputCheck], list[Mismatch]]:
    """Compare one runnable file's outputs with the reference; return the numbers and every mismatch."""
    checks: list[OutputCheck] = []
    mismatches: list[Mismatch] = []
    for name in got:
        if name not in {s.name for s in signature.outputs}:
            mismatches.append(Mismatch(where, name, "unexpected", "no such output", "an output"))
    for spec in signature.outputs:
        if spec.name not in got:
            mismatches.append(Mismatch(where, spec.name, "missing", "an output", "none"))
            continue
        out, ref = np.asarray(got[spec.name]), np.asarray(reference[spec.name])
        if out.shape != ref.shape or out.shape != spec.concrete_shape:
            mismatches.append(Mismatch(where, spec.name, "shape", f"{spec.concrete_shape} (reference {ref.shape})", str(out.shape)))
            continue
        if str(out.dtype) != spec.dtype:
            mismatches.append(Mismatch(where, spec.name, "dtype", spec.dtype, str(out.dtype)))
        if not np.isfinite(out).all():
            mismatches.append(Mismatch(where, spec.name, "non-finite", "finite values", f"{int((~np.isfinite(out)).sum())} non-finite"))
            continue
        c = compare(out, ref, tolerance)
        err, psnr = c.max_abs, c.psnr_db
        checks.append(OutputCheck(where, spec.name, err, psnr, c.passed))
        if not c.passed:
            mismatches.append(
                Mismatch(where, spec.name, "tolerance", tolerance.describe(),
                         f"max abs error {err:.3g}, PSNR {psnr:.1f} dB over shape {out.shape}")
            )
    return checks, mismatches


def spec_mismatches(where: str, declared: Sequence[TensorSpec], found: Sequence[TensorSpec], side: str) -> list[Mismatch]:
    """Compare declared tensor specs with those found in a file (names in order, dtypes, shapes)."""
    out = []
    found_by_name = {s.name: s for s in found}
    if [s.name for s in found] != [s.name for s in declared] and set(found_by_name) == {s.name for s in declared}:
        out.append(Mismatch(where, "", "spec", f"{side}s in order {[s.name for s in declared]}", str([s.name for s in found])))
    for spec in declared:
        f = found_by_name.get(spec.name)
        if f is None:
            out.append(Mismatch(where, spec.name, "missing", f"an {side}", f"{side}s {sorted(found_by_name)}"))
            continue
        if f.dtype != spec.dtype:
            out.append(Mismatch(where, spec.name, "dtype", spec.dtype, f.dtype))
        if tuple(f.shape) != spec.concrete_shape:
            out.append(Mismatch(where, spec.name, "shape", str(spec.concrete_shape), str(tuple(f.shape))))
    for name in found_by_name:
        if name not in {s.name for s in declared}:
            out.append(Mismatch(where, name, "unexpected", f"no such {side}", f"an {side}"))
    return out


# ----------------------------------------------------------------------------------------------- exporters


class Exporter(abc.ABC):
    """Turns a component of a loaded family into files, runs them, and checks them against torch.

    Subclasses are dataclasses whose fields are the exporter's options (each with a comment), are
    registered with :func:`register_exporter` and implement ``_export``, ``_run`` and ``_spec_mismatches``.
    """

    name: ClassVar[str]  # registry name, e.g. "onnx"
    suffix: ClassVar[str]  # file suffix of the primary file, e.g. ".onnx"

    @property
    def precision(self) -> str:
        """The compute precision the files run at (picks the component's tolerance)."""
        return "fp32"

    def options(self) -> dict[str, Any]:
        """The exporter's options, as recorded in artifact metadata."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def runtime_unavailable_reason(self) -> str | None:
        """Why this machine cannot run the artifacts, or None when it can."""
        return None

    # -- the interface -------------------------------------------------------------------------------

    def export(self, component: Component, model: LoadedModel, out_dir: str | Path) -> Artifact:
        """Export ``component`` of ``model`` into ``out_dir`` and write its metadata JSON.

        Raises:
            ExportError: the conversion failed (the message quotes the converter's error).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        signature = component.signature(model)
        t0 = time.perf_counter()
        files, runnable, extra = self._export(component, model, signature, out)
        seconds = time.perf_counter() - t0
        metadata = {
            "family_id": model.family_id,
            "family_root": str(model.ref.root),
            "unet_variant": model.ref.variant,
            "exporter_options": self.options(),
            "export_seconds": round(seconds, 3),
            "versions": tool_versions(),
            **extra,
        }
        artifact = Artifact(
            exporter=self.name,
            component=component.name,
            signature=signature,
            files=files,
            runnable=runnable,
            precision=self.precision,
            tolerance=component.tolerance(self.precision),
            metadata=metadata,
        )
        artifact.write_metadata()
        return artifact

    def run(self, artifact: Artifact, inputs: Arrays, *, role: str | None = None) -> dict[str, np.ndarray]:
        """Run one runnable file of ``artifact`` (default: the primary one) on ``inputs``.

        Raises:
            InputSpecError: the inputs do not match the declared names, dtypes and shapes.
            RuntimeUnavailableError: this machine has no runtime for the format.
        """
        role = role or artifact.runnable[0]
        if role not in artifact.runnable:
            raise UnknownNameError(f"unknown file role {role!r}; expected one of: {', '.join(artifact.runnable)}")
        reason = self.runtime_unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailableError(reason)
        arrays = check_inputs(artifact.signature, inputs)
        return self._run(artifact, role, arrays)

    def check_spec(self, artifact: Artifact) -> None:
        """Check the files' declared inputs/outputs (and format facts) without running them.

        Raises:
            ValidationError: with every mismatch found.
        """
        mismatches = self._spec_mismatches(artifact)
        if mismatches:
            raise ValidationError(artifact.label, mismatches)

    def validate(
        self,
        artifact: Artifact,
        model: LoadedModel,
        inputs: Arrays | None = None,
        *,
        reference: Arrays | None = None,
    ) -> ValidationReport:
        """Check the spec, then run every runnable file and compare with the torch reference.

        Args:
            artifact: what :meth:`export` returned.
            model: the family the artifact was exported from (gives the reference module).
            inputs: default: the component's realistic example inputs.
            reference: expected outputs; default: the torch module's outputs on ``inputs``.

        Raises:
            ValidationError: every spec and output mismatch, collected across all files.
            RuntimeUnavailableError: this machine cannot run the format (check_spec still works).
        """
        from relaydiff.export.components import component_for

        component = component_for(artifact.component, model)
        mismatches = list(self._spec_mismatches(artifact))
        reason = self.runtime_unavailable_reason()
        if reason is not None:
            if mismatches:
                raise ValidationError(artifact.label, mismatches)
            raise RuntimeUnavailableError(f"cannot validate {artifact.label} by running it: {reason}")
        inputs = component.example_inputs(model) if inputs is None else inputs
        reference = component.reference(model, inputs) if reference is None else reference
        checks: list[OutputCheck] = []
        for role in artifact.runnable:
            got = self.run(artifact, inputs, role=role)
            c, m = compare_outputs(role, artifact.signature, got, reference, artifact.tolerance)
            checks += c
            mismatches += m
        if mismatches:
            raise ValidationError(artifact.label, mismatches)
        return ValidationReport(artifact.label, artifact.tolerance, tuple(checks))

    # -- what a format implements ----------------------------------------------------------------------

    @abc.abstractmethod
    def _export(
        self, component: Component, model: LoadedModel, signature: Signature, out_dir: Path
    ) -> tuple[dict[str, Path], tuple[str, ...], dict[str, Any]]:
        """Write the files; return (files by role, runnable roles, extra metadata)."""

    @abc.abstractmethod
    def _run(self, artifact: Artifact, role: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the file of ``role`` on checked inputs; return outputs by declared name."""

    @abc.abstractmethod
    def _spec_mismatches(self, artifact: Artifact) -> list[Mismatch]:
        """Every difference between the files and the declared signature (and format facts)."""


EXPORTERS: Registry[type[Exporter]] = Registry("exporter")

E = TypeVar("E", bound=type[Exporter])


def register_exporter(cls: E) -> E:
    """Class decorator: register an exporter class under its ``name``."""
    EXPORTERS.add(cls.name, cls)
    return cls


def get_exporter(name: str, **options: Any) -> Exporter:
    """A new exporter ``name`` with ``options`` (its dataclass fields).

    Raises:
        UnknownNameError: ``name`` is not registered (lists the known ones).
        TypeError: an option the exporter does not have (lists the ones it accepts).
    """
    cls = EXPORTERS.get(name)
    accepted: list[str] = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"exporter {name!r} has no option(s) {unknown}; it accepts: {', '.join(accepted) or 'none'}")
    return cls(**options)


def list_exporters() -> list[str]:
    return EXPORTERS.names()


def tool_versions() -> dict[str, str]:
    """Versions of Python and of the export toolchain's packages that are installed (recorded in artifact metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "optimum-onnx", "coremltools", "executorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def torch_reference(module: Callable[..., Any], inputs: Arrays, signature: Signature) -> dict[str, np.ndarray]:
    """Run a torch module on numpy inputs (in declared order) and return its outputs by declared name."""
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in signature.inputs]
    with torch.no_grad():
        out = module(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if len(outs) != len(signature.outputs):
        raise ExportError(f"the torch module returned {len(outs)} outputs; {len(signature.outputs)} are declared")
    return {s.name: o.detach().cpu().numpy() for s, o in zip(signature.outputs, outs, strict=True)}
