"""The bundle manifest as typed records, read and validated in one place.

``manifest.json`` is validated against ``manifest.schema.json`` (beside this file) with the
``jsonschema`` library when it becomes a :class:`Manifest` (:meth:`Manifest.from_json`); inside
relaydiff nobody indexes its raw dict. :meth:`Manifest.to_json` writes exactly what is read back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.metrics import Tolerance
from relaydiff.core.student import STUDENT_FORMAT, StudentSpec

FORMAT = "relaydiff-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest of 64 artifacts is ~100 KiB
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class BundleError(RelaydiffError):
    """A bundle could not be built, or did not verify (``problems`` lists every finding)."""

    def __init__(self, message: str, problems: Sequence[str] = (), *, listed: bool = True) -> None:
        """``listed``: append every problem to the message, one per line (else the caller summarised them)."""
        self.problems = tuple(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems) if listed else ""
        super().__init__(f"{message}{lines}")


def load_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return data


def schema_problems(manifest: Any, schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every place ``manifest`` breaks the manifest schema (JSON Schema 2020-12, checked by ``jsonschema``), as "path: problem"."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema or load_schema())
    return [f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


def read_manifest(folder: Path) -> dict[str, Any]:
    """The raw JSON of ``folder/manifest.json`` (capped at MAX_MANIFEST_BYTES, a JSON object); not yet validated.

    Raises:
        BundleError: missing, oversized or not a JSON object.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"'{path}' is missing: not a bundle folder")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest.json is {size} bytes; the cap is {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(path.read_bytes(), parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"manifest.json must hold a JSON object, got {type(data).__name__}")
    return data


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


@dataclass(frozen=True)
class TensorEntry:
    """A declared input or output of an artifact, with its fixed shape."""

    name: str
    dtype: str  # "float32", "float16", "int32" or "int64"
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorEntry:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: its path inside the folder, sha256 and size."""

    file: str  # bundle-relative, "/"-separated
    sha256: str
    size: int
    component: str | None = None  # set on parity fixtures

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "size": self.size}
        if self.component is not None:
            data["component"] = self.component
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        return cls(data["file"], data["sha256"], data["size"], data.get("component"))


@dataclass(frozen=True)
class ArtifactEntry:
    """One exported artifact: its primary file, what it is, its declared inputs/outputs and the parity measured at build."""

    file: str
    sha256: str
    size: int
    target: str  # "onnx", "coreml" or "executorch"
    precision: str  # "fp32" or "int8"
    component: str  # "unet_step", "vae_decoder" or "text_encoder"
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    extra_files: tuple[FileEntry, ...]  # siblings: the .ort file, the metadata JSON...
    tolerance: Tolerance  # the bar the parity fixture is held to
    calibration: Mapping[str, Any] | None  # the INT8 calibration set's summary (None for fp32)
    parity: Mapping[str, Any]  # figures measured at build time
    method: str | None = None  # how it was made, in words
    compute_precision: str | None = None  # CoreML: the compute precision of its ops

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.target, self.precision, self.component)

    def input(self, name: str) -> TensorEntry | None:
        return next((t for t in self.inputs if t.name == name), None)

    def runnable_files(self) -> list[str]:
        """The files that run on their own: the primary file, and for ONNX its .ort sibling."""
        files = [self.file]
        if self.target == "onnx":
            files += [e.file for e in self.extra_files if e.file.endswith(".ort")]
        return files

    def metadata_file(self) -> str | None:
        """The exporter's metadata JSON among the extra files, if listed."""
        return next((e.file for e in self.extra_files if e.file.endswith(".json")), None)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "file": self.file, "sha256": self.sha256, "size": self.size, "target": self.target, "precision": self.precision,
            "component": self.component, "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "extra_files": [e.to_json() for e in self.extra_files], "tolerance": self.tolerance.to_json(),
            "calibration": None if self.calibration is None else dict(self.calibration), "parity": dict(self.parity),
        }
        if self.method is not None:
            data["method"] = self.method
        if self.compute_precision is not None:
            data["compute_precision"] = self.compute_precision
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArtifactEntry:
        return cls(
            file=data["file"], sha256=data["sha256"], size=data["size"], target=data["target"], precision=data["precision"],
            component=data["component"], inputs=tuple(TensorEntry.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorEntry.from_json(t) for t in data["outputs"]),
            extra_files=tuple(FileEntry.from_json(e) for e in data["extra_files"]),
            tolerance=Tolerance.from_json(data["tolerance"]), calibration=data["calibration"], parity=data["parity"],
            method=data.get("method"), compute_precision=data.get("compute_precision"),
        )


@dataclass(frozen=True)
class FamilySection:
    """The family the bundle was built from."""

    id: str  # the family id relay states carry
    config_hash: str  # sha256 over the family's config files (relaydiff.runtime.bundle.family_config_hash)
    device_variant: str
    host_variant: str
    config_files: tuple[str, ...] = ()  # the files config_hash covers

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "config_hash": self.config_hash, "config_files": list(self.config_files),
                "device_variant": self.device_variant, "host_variant": self.host_variant}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FamilySection:
        return cls(data["id"], data["config_hash"], data["device_variant"], data["host_variant"], tuple(data.get("config_files", ())))


@dataclass(frozen=True)
class SchedulerSection:
    """The sampler and timestep grid the bundle was built and checked for."""

    sampler: str
    steps: int
    timesteps: tuple[int, ...]
    config: Mapping[str, Any]  # the scheduler's full diffusers config

    def to_json(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "timesteps": list(self.timesteps), "config": dict(self.config)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SchedulerSection:
        return cls(data["sampler"], data["steps"], tuple(data["timesteps"]), dict(data["config"]))


@dataclass(frozen=True)
class LatentSection:
    """The latent the artifacts take and the image the decoder gives."""

    shape: tuple[int, ...]  # (1, C, h, w)
    vae_scaling_factor: float
    vae_shift_factor: float | None = None
    image_shape: tuple[int, ...] = ()  # (1, 3, H, W)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shape": list(self.shape), "vae_scaling_factor": self.vae_scaling_factor,
                                "vae_shift_factor": self.vae_shift_factor}
        if self.image_shape:
            data["image_shape"] = list(self.image_shape)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatentSection:
        return cls(tuple(data["shape"]), float(data["vae_scaling_factor"]), data.get("vae_shift_factor"), tuple(data.get("image_shape", ())))


@dataclass(frozen=True)
class BundleStudent:
    """A distilled student's jumps, when the bundle's device model is one."""

    spec: StudentSpec
    step_indices: tuple[int, ...]  # the grid indices it evaluates
    timesteps: tuple[int, ...]  # the grid timesteps at those indices

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        data: dict[str, Any] = {"format": STUDENT_FORMAT, "teacher": s.teacher, "sampler": s.sampler, "student_steps": s.student_steps,
                                "guidance_scale": s.guidance_scale, "relay_step": s.relay_step, "steps": s.steps,
                                "step_indices": list(self.step_indices), "timesteps": list(self.timesteps),
                                "parametrization": s.parametrization}
        data.update({k: v for k, v in (("timestep_scaling", s.timestep_scaling), ("sigma_data", s.sigma_data)) if v is not None})
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BundleStudent:
        spec = StudentSpec(teacher=data.get("teacher", ""), relay_step=data["relay_step"], steps=data["steps"],
                           student_steps=data["student_steps"], guidance_scale=float(data["guidance_scale"]), sampler=data["sampler"],
                           parametrization=data.get("parametrization", "eps"), timestep_scaling=data.get("timestep_scaling"),
                           sigma_data=data.get("sigma_data"))
        return cls(spec, tuple(data["step_indices"]), tuple(data["timesteps"]))


@dataclass(frozen=True)
class RelaySection:
    """Where the relay hands over: the device runs steps [relay_step, steps)."""

    relay_step: int
    steps: int
    device_steps: tuple[int, int]
    student: BundleStudent | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"relay_step": self.relay_step, "steps": self.steps, "device_steps": list(self.device_steps)}
        if self.student is not None:
            data["student"] = self.student.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RelaySection:
        student = data.get("student")
        return cls(data["relay_step"], data["steps"], (data["device_steps"][0], data["device_steps"][1]),
                   None if student is None else BundleStudent.from_json(student))


@dataclass(frozen=True)
class SkippedEntry:
    """An artifact the build did not make, and why."""

    target: str
    precision: str
    reason: str
    component: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"target": self.target, "precision": self.precision, "reason": self.reason}
        if self.component is not None:
            data["component"] = self.component
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SkippedEntry:
        return cls(data["target"], data["precision"], data["reason"], data.get("component"))


@dataclass(frozen=True)
class CacheSection:
    """Feature caching on the device (docs/cache.md): how the ``unet_step_full``/``unet_step_cached`` pair is used."""

    mechanism: str  # "reuse" or "forecast": what a cached step's deep features are
    cache_branch: int  # the skip branch the UNet was split at
    policy: FileEntry | None = None  # the learned schedule's JSON config (None: the budget is spent uniformly)
    policy_weights: FileEntry | None = None  # its safetensors weights
    policy_family_id: str | None = None  # the family the policy was trained for (must be the bundle's)

    def files(self) -> list[FileEntry]:
        return [e for e in (self.policy, self.policy_weights) if e is not None]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mechanism": self.mechanism, "cache_branch": self.cache_branch}
        for key in ("policy", "policy_weights"):
            entry = getattr(self, key)
            if entry is not None:
                data[key] = entry.to_json()
        if self.policy_family_id is not None:
            data["policy_family_id"] = self.policy_family_id
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CacheSection:
        files = {k: FileEntry.from_json(data[k]) if k in data else None for k in ("policy", "policy_weights")}
        return cls(data["mechanism"], data["cache_branch"], files["policy"], files["policy_weights"], data.get("policy_family_id"))


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``."""

    family: FamilySection
    scheduler: SchedulerSection
    latent: LatentSection
    relay: RelaySection
    artifacts: tuple[ArtifactEntry, ...]
    parity_fixtures: tuple[FileEntry, ...]
    tools: Mapping[str, str] = field(default_factory=dict)  # package versions of the build
    skipped: tuple[SkippedEntry, ...] = ()
    created: str | None = None
    cache: CacheSection | None = None  # set when the bundle carries the cached-step graphs (optional: older bundles have none)

    def artifacts_for(self, target: str, precision: str) -> dict[str, ArtifactEntry]:
        """The artifacts of one target and precision, by component."""
        return {a.component: a for a in self.artifacts if (a.target, a.precision) == (target, precision)}

    def fixture(self, component: str) -> FileEntry | None:
        return next((e for e in self.parity_fixtures if e.component == component), None)

    def files(self) -> list[FileEntry]:
        """Every file the manifest lists (fixtures, artifacts and their extra files)."""
        out = list(self.parity_fixtures)
        for a in self.artifacts:
            out += [FileEntry(a.file, a.sha256, a.size), *a.extra_files]
        if self.cache is not None:
            out += self.cache.files()
        return out

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "family": self.family.to_json(), "scheduler": self.scheduler.to_json(),
            "latent": self.latent.to_json(), "relay": self.relay.to_json(), "artifacts": [a.to_json() for a in self.artifacts],
            "parity_fixtures": [e.to_json() for e in self.parity_fixtures], "tools": dict(self.tools),
            "skipped": [s.to_json() for s in self.skipped],
        }
        if self.created is not None:
            data["created"] = self.created
        if self.cache is not None:
            data["cache"] = self.cache.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str = MANIFEST) -> Manifest:
        """Validate ``data`` against the manifest schema and build the records.

        Raises:
            BundleError: listing every schema problem.
        """
        problems = schema_problems(data)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BundleError(f"'{where}' is not a relaydiff bundle manifest: {problems[0]}{more}", problems, listed=False)
        return cls._from_valid(data)

    @classmethod
    def _from_valid(cls, data: Mapping[str, Any]) -> Manifest:
        """The records of JSON that already passed :func:`schema_problems` (verify checks first, then builds)."""
        return cls(
            family=FamilySection.from_json(data["family"]), scheduler=SchedulerSection.from_json(data["scheduler"]),
            latent=LatentSection.from_json(data["latent"]), relay=RelaySection.from_json(data["relay"]),
            artifacts=tuple(ArtifactEntry.from_json(a) for a in data["artifacts"]),
            parity_fixtures=tuple(FileEntry.from_json(e) for e in data["parity_fixtures"]),
            tools=dict(data["tools"]), skipped=tuple(SkippedEntry.from_json(s) for s in data["skipped"]), created=data.get("created"),
            cache=CacheSection.from_json(data["cache"]) if "cache" in data else None,
        )

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read and validate ``folder/manifest.json``.

        Raises:
            BundleError: missing, oversized, not JSON, or not matching the schema (every problem listed).
        """
        return cls.from_json(read_manifest(folder), where=str(folder / MANIFEST))
