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
from relaydiff.runtime.gates import Gate, status_of

FORMAT = "relaydiff-bundle"
VERSION = 2  # 2: per-artifact gates and status, the tokenizer, device_loop and runtime requirements
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


def version_problem(manifest: Any) -> str | None:
    """Why a manifest of another format version cannot be read (the schema's own message would not say "rebuild"), else None."""
    if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT or manifest.get("version") == VERSION:
        return None
    got = manifest.get("version")
    return (f"bundle manifest format version {got!r}; this relaydiff reads version {VERSION}: rebuild the bundle with "
            "`relaydiff bundle build` (version 2 added per-artifact gates, the tokenizer, device_loop and runtime requirements)")


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
    gates: tuple[Gate, ...] = ()  # the bars of relaydiff.runtime.gates, measured at build time
    status: str = "unmeasured"  # "passed", "failed" (built with --allow-failing; the runtime refuses it) or "unmeasured"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.target, self.precision, self.component)

    @property
    def name(self) -> str:
        return "/".join(self.key)

    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if g.passed is False]

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
            "gates": [g.to_json() for g in self.gates], "status": self.status,
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
            gates=tuple(Gate.from_json(g) for g in data["gates"]), status=data["status"],
        )

    def status_problem(self) -> str | None:
        """Why the recorded status is not what the recorded gates give (a hand-edited manifest), else None."""
        want = status_of(self.gates)
        return None if want == self.status else f"{self.file}: status {self.status!r} but its gates give {want!r}"


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
class TokenizerSection:
    """The family's tokenizer, copied into the bundle (device-only generation needs it)."""

    folder: str  # bundle-relative folder, loadable with transformers' ``<class>.from_pretrained``
    tokenizer_class: str  # e.g. "CLIPTokenizer"
    max_length: int  # token ids are padded / truncated to this length
    files: tuple[FileEntry, ...]
    uncond_prompt: str = ""  # the prompt whose embeddings are the unconditional half of CFG

    def to_json(self) -> dict[str, Any]:
        return {"folder": self.folder, "class": self.tokenizer_class, "max_length": self.max_length,
                "files": [f.to_json() for f in self.files], "uncond_prompt": self.uncond_prompt, "input_ids_dtype": "int32"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenizerSection:
        return cls(data["folder"], data["class"], data["max_length"], tuple(FileEntry.from_json(f) for f in data["files"]),
                   data.get("uncond_prompt", ""))


@dataclass(frozen=True)
class LoopStep:
    """One device denoiser call: grid index, timestep and the DDIM constants of its update."""

    index: int  # index into the timestep grid
    timestep: int
    alpha_cumprod: float  # a_t = alphas_cumprod[t]
    alpha_cumprod_prev: float  # a_prev: alphas_cumprod of the timestep the update lands on (final_alpha_cumprod after the last)
    c_skip: float | None = None  # LCM-parametrized students: f = c_skip * x + c_out * x0 (None: eps used as is)
    c_out: float | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index, "timestep": self.timestep, "alpha_cumprod": self.alpha_cumprod,
                                "alpha_cumprod_prev": self.alpha_cumprod_prev}
        if self.c_skip is not None:
            data.update(c_skip=self.c_skip, c_out=self.c_out)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoopStep:
        return cls(data["index"], data["timestep"], data["alpha_cumprod"], data["alpha_cumprod_prev"], data.get("c_skip"), data.get("c_out"))


DDIM_UPDATE = ("x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t); x = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps "
               "(DDIM, eta = 0; no clipping, no thresholding; scale_model_input is the identity)")
LCM_EPS = ("x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t); f = c_skip * x + c_out * x0; eps = (x - sqrt(a_t) * f) / sqrt(1 - a_t), "
           "before the update")
CFG_FORMULA = "eps = eps_uncond + g * (eps_cond - eps_uncond), computed inside unet_step"


@dataclass(frozen=True)
class DeviceLoop:
    """Everything the device half needs to finish a hand-off with the bundle's artifacts, without a diffusers scheduler.

    From a hand-off at grid step k (latent x, conditional and unconditional text embeddings, guidance g):
    for each step in ``steps`` with index >= k (the first must be k), eps = unet_step(sample=x, timestep=[t], text_embeds=[uncond, cond],
    guidance_scale=[g]) (a student: text_embeds = cond only, no guidance input), then ``update``; finally
    image = vae_decoder(latent=x) (scaling, shift and the [-1, 1] -> [0, 1] map are inside the decoder).
    """

    sampler: str  # "ddim"
    prediction_type: str  # "epsilon"
    timesteps: tuple[int, ...]  # the whole N-step grid (a relay state carries the same)
    steps: tuple[LoopStep, ...]  # teacher: every grid step (a hand-off at k runs those with index >= k); student: its jumps from k
    inputs: tuple[TensorEntry, ...]  # unet_step's inputs (names, dtypes, shapes)
    cfg: bool  # unet_step takes [uncond, cond] embeddings and a guidance scale
    update: str = DDIM_UPDATE
    eps_transform: str | None = None  # LCM_EPS for an LCM-parametrized student
    decode_input: str = "latent"
    decode_output: str = "image"  # (1, 3, H, W) float32 in [0, 1]; uint8 HWC = round(image[0].transpose(1, 2, 0) * 255)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sampler": self.sampler, "prediction_type": self.prediction_type, "eta": 0.0, "timesteps": list(self.timesteps),
            "steps": [s.to_json() for s in self.steps], "update": self.update,
            "unet_step": {"inputs": [t.to_json() for t in self.inputs], "output": "noise_pred",
                          "timestep": "the step's timestep as float32, shape (1,)"},
            "cfg": ({"order": ["uncond", "cond"], "input": "text_embeds", "guidance_input": "guidance_scale", "formula": CFG_FORMULA}
                    if self.cfg else None),
            "decode": {"input": self.decode_input, "output": self.decode_output,
                       "formula": "image = clamp(vae.decode(latent / vae_scaling_factor + vae_shift_factor) / 2 + 0.5, 0, 1), "
                                  "inside vae_decoder (latent.vae_scaling_factor / vae_shift_factor are the constants)",
                       "to_uint8": "round(image[0].transpose(1, 2, 0) * 255)"},
        }
        if self.eps_transform is not None:
            data["eps_transform"] = self.eps_transform
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceLoop:
        return cls(data["sampler"], data["prediction_type"], tuple(data["timesteps"]), tuple(LoopStep.from_json(s) for s in data["steps"]),
                   tuple(TensorEntry.from_json(t) for t in data["unet_step"]["inputs"]), data["cfg"] is not None, data["update"],
                   data.get("eps_transform"), data["decode"]["input"], data["decode"]["output"])


@dataclass(frozen=True)
class RuntimeRequirement:
    """What a device needs to run one target's artifacts."""

    target: str
    runtime: str  # "onnxruntime", "executorch" or "coreml"
    minimum: str  # the oldest runtime version / OS the artifacts are stated to need
    built_with: str  # the version the artifacts were built and checked with
    delegates: tuple[str, ...] = ()  # execution providers / backends / kernels the artifacts were lowered for
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "runtime": self.runtime, "minimum": self.minimum, "built_with": self.built_with,
                "delegates": list(self.delegates), "note": self.note}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuntimeRequirement:
        return cls(data["target"], data["runtime"], data["minimum"], data["built_with"], tuple(data["delegates"]), data.get("note", ""))


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
class SafetyCheckerSection:
    """The image safety checker the bundle carries (runtime.safety): its preprocessing file and how its scores are read."""

    preprocessor: FileEntry  # feature_extractor/preprocessor_config.json (CLIPImageProcessor's sizes, mean and std)
    concepts: int  # columns of concept_scores
    special_concepts: int  # columns of special_scores
    source_class: str = "StableDiffusionSafetyChecker"  # the diffusers class exported
    component: str = "safety_checker"
    rule: str = "nsfw = any(concept_scores > 0); a flagged image is replaced by a black image"

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "source_class": self.source_class, "preprocessor": self.preprocessor.to_json(),
                "concepts": self.concepts, "special_concepts": self.special_concepts, "rule": self.rule}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SafetyCheckerSection:
        return cls(FileEntry.from_json(data["preprocessor"]), data["concepts"], data["special_concepts"], data["source_class"],
                   data["component"], data["rule"])


@dataclass(frozen=True)
class DenylistSection:
    """The prompt denylist the bundle carries (runtime.safety): a text file, one word or phrase a line."""

    file: FileEntry
    entries: int
    match: str = "case-insensitive, whole words"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file.to_json(), "entries": self.entries, "match": self.match}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DenylistSection:
        return cls(FileEntry.from_json(data["file"]), data["entries"], data["match"])


@dataclass(frozen=True)
class OptimumLayoutSection:
    """``bundle build --layout optimum``: the folder optimum's ORTStableDiffusionPipeline loads, and its files."""

    folder: str
    files: tuple[FileEntry, ...]
    loader: str = "optimum.onnxruntime.ORTStableDiffusionPipeline"

    def to_json(self) -> dict[str, Any]:
        return {"folder": self.folder, "loader": self.loader, "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OptimumLayoutSection:
        return cls(data["folder"], tuple(FileEntry.from_json(f) for f in data["files"]), data["loader"])


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
    tokenizer: TokenizerSection | None = None  # None: built without the family's tokenizer (no text_encoder component)
    device_loop: DeviceLoop | None = None  # None: no unet_step in the bundle
    requirements: tuple[RuntimeRequirement, ...] = ()
    cache: CacheSection | None = None  # set when the bundle carries the cached-step graphs (optional: older bundles have none)
    safety_checker: SafetyCheckerSection | None = None  # None: the family has no safety checker (written as null)
    denylist: DenylistSection | None = None  # None: no prompt denylist in the bundle (written as null)
    optimum_layout: OptimumLayoutSection | None = None  # set by bundle build --layout optimum

    def artifacts_for(self, target: str, precision: str) -> dict[str, ArtifactEntry]:
        """The artifacts of one target and precision, by component."""
        return {a.component: a for a in self.artifacts if (a.target, a.precision) == (target, precision)}

    def fixture(self, component: str) -> FileEntry | None:
        return next((e for e in self.parity_fixtures if e.component == component), None)

    def files(self) -> list[FileEntry]:
        """Every file the manifest lists (fixtures, artifacts and their extra files)."""
        out = list(self.parity_fixtures) + (list(self.tokenizer.files) if self.tokenizer is not None else [])
        for a in self.artifacts:
            out += [FileEntry(a.file, a.sha256, a.size), *a.extra_files]
        if self.cache is not None:
            out += self.cache.files()
        if self.safety_checker is not None:
            out.append(self.safety_checker.preprocessor)
        if self.denylist is not None:
            out.append(self.denylist.file)
        if self.optimum_layout is not None:
            out += self.optimum_layout.files
        return out

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "family": self.family.to_json(), "scheduler": self.scheduler.to_json(),
            "latent": self.latent.to_json(), "relay": self.relay.to_json(), "artifacts": [a.to_json() for a in self.artifacts],
            "parity_fixtures": [e.to_json() for e in self.parity_fixtures], "tools": dict(self.tools),
            "skipped": [s.to_json() for s in self.skipped], "requirements": [r.to_json() for r in self.requirements],
            "tokenizer": None if self.tokenizer is None else self.tokenizer.to_json(),
            "device_loop": None if self.device_loop is None else self.device_loop.to_json(),
            "safety_checker": None if self.safety_checker is None else self.safety_checker.to_json(),
            "denylist": None if self.denylist is None else self.denylist.to_json(),
        }
        if self.created is not None:
            data["created"] = self.created
        if self.cache is not None:
            data["cache"] = self.cache.to_json()
        if self.optimum_layout is not None:
            data["optimum_layout"] = self.optimum_layout.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str = MANIFEST) -> Manifest:
        """Validate ``data`` against the manifest schema and build the records.

        Raises:
            BundleError: listing every schema problem.
        """
        old = version_problem(data)
        if old is not None:
            raise BundleError(f"'{where}': {old}")
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
            tokenizer=None if data["tokenizer"] is None else TokenizerSection.from_json(data["tokenizer"]),
            device_loop=None if data["device_loop"] is None else DeviceLoop.from_json(data["device_loop"]),
            requirements=tuple(RuntimeRequirement.from_json(r) for r in data["requirements"]),
            cache=CacheSection.from_json(data["cache"]) if "cache" in data else None,
            safety_checker=SafetyCheckerSection.from_json(data["safety_checker"]) if data.get("safety_checker") is not None else None,
            denylist=DenylistSection.from_json(data["denylist"]) if data.get("denylist") is not None else None,
            optimum_layout=OptimumLayoutSection.from_json(data["optimum_layout"]) if "optimum_layout" in data else None,
        )

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read and validate ``folder/manifest.json``.

        Raises:
            BundleError: missing, oversized, not JSON, or not matching the schema (every problem listed).
        """
        return cls.from_json(read_manifest(folder), where=str(folder / MANIFEST))
