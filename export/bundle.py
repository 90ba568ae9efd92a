"""Mobile bundles: the device half of a family exported per target and precision, with a verifiable manifest.

A bundle folder holds ``<target>/<precision>/<files>``, ``parity/<component>.safetensors`` (inputs
drawn from a held-out relay and the torch fp32 outputs on them), ``manifest.json`` and
``manifest.sha256``; :func:`build` also writes ``<folder>.zip``. The manifest (schema:
``manifest.schema.json`` beside this file) says, for every artifact, its file, sha256, size, target,
precision, component, inputs/outputs, the relay-step range its INT8 calibration covered, the parity
measured at build time, and for the whole bundle the family id and config hash, the scheduler config
and timestep grid, the latent shape and VAE scaling, and tool versions.

:func:`verify` re-checks sizes, hashes and the schema, refuses files outside the folder and files the
manifest does not list, and re-runs parity where the runtime exists on this OS (ONNX via onnxruntime,
.pte via ExecuTorch; CoreML only on macOS). Nothing in a bundle is unpickled or evaluated: the manifest
is capped JSON and the fixtures are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.export.base import Tolerance, UnknownNameError, psnr_db

FORMAT = "relaydiff-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest of 64 artifacts is ~100 KiB
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
TARGETS = ("onnx", "coreml", "executorch")
PRECISIONS = ("fp32", "int8")
COMPONENTS = ("unet_step", "vae_decoder", "text_encoder")
# INT8 method per component for ONNX: static QDQ (relay-aware calibration) for the UNet; dynamic for the
# decoder and text encoder (static INT8 of the tiny decoder cost ~20 dB of image PSNR, dynamic none).
ONNX_INT8_METHODS = {"unet_step": "static", "vae_decoder": "dynamic", "text_encoder": "dynamic"}
# Activations of the static ONNX INT8 unet_step. 16-bit activations are the default: on the trained family the
# CFG step eps_u + g (eps_c - eps_u) multiplies the 8-bit activation error of the two passes by g, and uint8
# activations gave a relayed image of 21 dB against fp32 (W8A16: 44 dB; the bar is 30 dB). Weights are
# int8 either way, so the size gain is the same; W8A16 runs as Q/DQ + float kernels on a CPU (slower), and
# natively on phone NPUs that take 16-bit activations.
ONNX_ACTIVATIONS = {"w8a16": "QInt16", "w8a8": "QUInt8"}
_FAMILY_CONFIGS = ("model_index.json", "family.json", "scheduler/scheduler_config.json", "vae/config.json",
                   "text_encoder/config.json", "tokenizer/tokenizer_config.json")


class BundleError(RelaydiffError):
    """A bundle could not be built, or did not verify (``problems`` lists every finding)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = tuple(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{message}{lines}")


@dataclass(frozen=True)
class BundleConfig:
    """What :func:`build` makes."""

    family: Path  # family folder (host and device variants)
    out: Path  # bundle folder (must be empty or absent); the zip goes beside it as <out>.zip
    targets: tuple[str, ...] = ("onnx",)  # subset of TARGETS
    precisions: tuple[str, ...] = ("fp32",)  # subset of PRECISIONS
    relay_step: int = 8  # k: the device runs [k, N); INT8 calibration is drawn from these steps
    steps: int = 25  # N
    components: tuple[str, ...] = COMPONENTS  # which device components to export
    calibration_prompts: int = 48  # relay-aware calibration prompts; 4 under-cover the trained device (README)
    eval_prompts: int = 2  # held-out relays for the build-time parity figures
    coreml_target: str = "iOS18"  # CoreML deployment target
    zip: bool = True  # also write <out>.zip
    device_variant: str | None = None  # the family's device UNet variant (e.g. "student"); None: its default device
    onnx_int8: str = "w8a16"  # ONNX static INT8 of unet_step: int8 weights with 16-bit ("w8a16") or 8-bit ("w8a8") activations
    executorch_float: tuple[str, ...] | None = None  # ExecuTorch INT8: module paths kept float; None: DEFAULT_FLOAT_MODULES

    def __post_init__(self) -> None:
        check_names("target", self.targets, TARGETS)
        check_names("precision", self.precisions, PRECISIONS)
        check_names("component", self.components, COMPONENTS)
        check_names("ONNX INT8 scheme", (self.onnx_int8,), tuple(ONNX_ACTIVATIONS))
        if not 0 <= self.relay_step < self.steps:
            raise RelaydiffError(f"relay step {self.relay_step!r} is outside [0, {self.steps}) (steps = {self.steps})")


def check_names(kind: str, got: Sequence[str], known: Sequence[str]) -> None:
    """Raise UnknownNameError naming the first unknown ``kind`` and listing the known ones (also for an empty list)."""
    if not got:
        raise UnknownNameError(f"no {kind} given; expected some of: {', '.join(known)}")
    for name in got:
        if name not in known:
            raise UnknownNameError(f"unknown {kind} {name!r}; expected one of: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------ hashing


def sha256_path(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a file, or of a folder (.mlpackage) as the hash of its sorted (relative path, file hash) list."""
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), path.stat().st_size
    if path.is_dir():
        h, size = hashlib.sha256(), 0
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            digest, n = sha256_path(p)
            h.update(f"{p.relative_to(path).as_posix()}\0{digest}\n".encode())
            size += n
        return h.hexdigest(), size
    raise FileNotFoundError(str(path))


def family_config_hash(root: Path) -> tuple[str, list[str]]:
    """sha256 over the family's config files (and every UNet config.json), with the files hashed."""
    files = [f for f in _FAMILY_CONFIGS if (root / f).is_file()]
    files += sorted(p.relative_to(root).as_posix() for p in root.glob("unet*/config.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    return h.hexdigest(), files


def _entry(root: Path, path: Path, **extra: Any) -> dict[str, Any]:
    digest, size = sha256_path(path)
    return {"file": path.relative_to(root).as_posix(), "sha256": digest, "size": size, **extra}


# ---------------------------------------------------------------------------------------------------- build


def build(config: BundleConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export, quantize, measure and hash every (target, precision, component); write the bundle. Returns the manifest.

    Raises:
        BundleError: the output folder is not empty.
        ExportError: an export or a quantization failed.
    """
    from tqdm.auto import tqdm

    from relaydiff.core import family
    from relaydiff.core.schedulers import build_scheduler
    from relaydiff.export.base import _versions

    say = log or (lambda _m: None)
    out = config.out
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"bundle folder '{out}' is not empty")
    host_ref = family.resolve(config.family, role="host")
    dev_ref = family.resolve(config.family, config.device_variant, role="device")
    family.check_pair(host_ref, dev_ref)
    host = family.load(host_ref)
    device = family.load(dev_ref, share_with=host)
    student = _student_section(device, config)
    if config.executorch_float and "executorch" in config.targets and "int8" in config.precisions:
        from relaydiff.export.components import component_for

        _check_module_paths(component_for("unet_step", device).module(device), config.executorch_float)
    out.mkdir(parents=True, exist_ok=True)

    fixtures, fixture_entries, held_out = _parity_fixtures(host, device, config, out)
    calibration = None
    if "int8" in config.precisions and ("onnx" in config.targets or "executorch" in config.targets):
        from relaydiff.quantize.calibration import CalibrationConfig, capture

        say(f"capturing relay-aware calibration: host [0, {config.relay_step}), device [{config.relay_step}, {config.steps})")
        calibration = capture(host, device, CalibrationConfig(relay_steps=(config.relay_step,), steps=config.steps,
                                                              prompts=config.calibration_prompts), progress=progress)

    jobs = [(t, p, c) for t in config.targets for p in config.precisions for c in config.components]
    artifacts: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    scratch = tempfile.mkdtemp(prefix="relaydiff-bundle-")
    fp32_onnx: dict[str, Any] = {"_scratch": scratch}
    try:
        for target, precision, comp in tqdm(jobs, desc="bundle", disable=not progress):
            sub = out / target / precision
            made = _make(target, precision, comp, device, sub, config, calibration, fp32_onnx)
            if isinstance(made, str):
                skipped.append({"target": target, "precision": precision, "component": comp, "reason": made})
                say(f"skipped {target}/{precision}/{comp}: {made}")
                continue
            artifact, method = made
            parity = _measure(target, artifact, fixtures[comp])
            if comp == "unet_step" and target in ("onnx", "executorch") and precision == "int8":
                parity["relay"] = _relay_figures(host, device, artifact, config, held_out)
            files = [f for role, f in artifact.files.items() if f != artifact.path]
            extra = [_entry(out, f) for f in (*files, artifact.metadata_path) if f.exists()]
            sig = artifact.signature
            artifacts.append({
                **_entry(out, artifact.path),
                "target": target, "precision": precision, "component": comp, "method": method,
                "compute_precision": artifact.precision if target == "coreml" else precision,
                "inputs": [_tensor(s) for s in sig.inputs], "outputs": [_tensor(s) for s in sig.outputs],
                "extra_files": extra, "tolerance": artifact.tolerance.to_json(),
                "calibration": artifact.metadata.get("calibration"),
                "parity": parity,
            })
            say(f"{target}/{precision}/{comp}: {artifact.path.name} {parity}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    scheduler = build_scheduler("ddim", device.scheduler_config)
    scheduler.set_timesteps(config.steps)
    from relaydiff.export.components import family_dims

    d = family_dims(device)
    config_hash, config_files = family_config_hash(dev_ref.root)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "family": {"id": device.family_id, "config_hash": config_hash, "config_files": config_files,
                   "device_variant": dev_ref.variant, "host_variant": host_ref.variant},
        "scheduler": {"sampler": "ddim", "steps": config.steps, "timesteps": [int(t) for t in scheduler.timesteps],
                      "config": {k: _plain(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}},
        "latent": {"shape": [1, d["C"], d["h"], d["w"]], "vae_scaling_factor": float(device.vae.config.scaling_factor),
                   "vae_shift_factor": getattr(device.vae.config, "shift_factor", None), "image_shape": [1, 3, d["H"], d["W"]]},
        "relay": {"relay_step": config.relay_step, "steps": config.steps, "device_steps": [config.relay_step, config.steps],
                  **({"student": student} if student is not None else {})},
        "artifacts": artifacts,
        "parity_fixtures": fixture_entries,
        "tools": {**_versions(), "relaydiff": _relaydiff_version()},
        "skipped": skipped,
    }
    problems = schema_problems(manifest)
    if problems:
        raise BundleError("the manifest built does not match its schema", problems)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (out / MANIFEST).write_text(text)
    (out / MANIFEST_HASH).write_text(hashlib.sha256(text.encode()).hexdigest() + "  " + MANIFEST + "\n")
    if config.zip:
        shutil.make_archive(str(out), "zip", root_dir=out)
    return manifest


def _make(
    target: str, precision: str, comp: str, device: Any, sub: Path, config: BundleConfig, calibration: Any, fp32_onnx: dict[str, Any]
) -> tuple[Any, str] | str:
    """Export one artifact; return (artifact, method note), or the reason it is skipped."""
    from relaydiff.export import get_exporter
    from relaydiff.export.components import component_for

    component = component_for(comp, device)
    if target == "onnx":
        if comp not in fp32_onnx:  # the fp32 model INT8 starts from; kept out of the bundle unless fp32 was asked for
            where = sub.parent / "fp32" if "fp32" in config.precisions else Path(fp32_onnx["_scratch"]) / comp
            fp32_onnx[comp] = get_exporter("onnx").export(component, device, where)
        if precision == "fp32":
            return fp32_onnx[comp], "torch/optimum -> onnx (+ optimized, .ort)"
        from relaydiff.quantize.onnx_int8 import OnnxInt8Config, quantize_onnx

        method = ONNX_INT8_METHODS[comp]
        q = OnnxInt8Config(method=method, activation_type=ONNX_ACTIVATIONS[config.onnx_int8]) if method == "static" else OnnxInt8Config(method=method)
        art = quantize_onnx(fp32_onnx[comp], sub, q, calibration if method == "static" else None)
        return art, f"onnxruntime quantize_{method}" + (f" ({config.onnx_int8}, per-channel int8 weights)" if method == "static" else "")
    if target == "coreml":
        fp = get_exporter("coreml", target=config.coreml_target, compute_precision="fp32" if precision == "fp32" else "fp16")
        art = fp.export(component, device, sub)
        fp.check_spec(art)
        if precision == "fp32":
            return art, f"coremltools mlprogram {config.coreml_target} fp32"
        from relaydiff.quantize.coreml_int8 import compress_coreml

        q = compress_coreml(art, sub)
        shutil.rmtree(art.path)
        art.metadata_path.unlink(missing_ok=True)
        return q, f"coremltools linear_quantize_weights int8 per-channel ({config.coreml_target}, fp16 compute)"
    if precision == "int8":
        from relaydiff.quantize.executorch_int8 import DEFAULT_FLOAT_MODULES, ExecuTorchInt8Config, export_int8

        q = ExecuTorchInt8Config(float_modules=DEFAULT_FLOAT_MODULES if config.executorch_float is None else config.executorch_float)
        art = export_int8(component, device, calibration.for_component(comp), sub, q, calibration_summary=calibration.summary())
        kept = art.metadata["quantization"]["float_modules"]
        return art, (f"torchao pt2e (XNNPACKQuantizer, per-channel, {len(kept)} modules float) -> XNNPACK -> .pte" if kept
                     else "torchao prepare_pt2e/convert_pt2e (XNNPACKQuantizer, per-channel) -> XNNPACK -> .pte")
    return get_exporter("executorch").export(component, device, sub), "torch.export -> XNNPACK -> .pte"


def _check_module_paths(root: Any, paths: Sequence[str]) -> None:
    """Raise naming each of ``paths`` that is no submodule of ``root`` (a typo would silently quantize everything)."""
    from relaydiff.quantize.executorch_int8 import resolve_module_paths

    unknown = [p for p in paths if not resolve_module_paths(root, [p])]
    if unknown:
        tops = ", ".join(n for n, _ in root.unet.named_children()) if hasattr(root, "unet") else ""
        raise RelaydiffError(f"--executorch-float: no module {', '.join(repr(u) for u in unknown)} in the device UNet step; "
                             f"expected paths like 'unet.up_blocks.-1' (children of unet: {tops})")


def _parity_fixtures(host: Any, device: Any, config: BundleConfig, out: Path) -> tuple[dict[str, dict[str, np.ndarray]], list[dict[str, Any]], Any]:
    """One held-out relay's inputs per component with torch fp32 outputs, saved as safetensors."""
    from safetensors.numpy import save_file

    from relaydiff.export.components import component_for
    from relaydiff.quantize.calibration import capture
    from relaydiff.quantize.parity import eval_config

    held = eval_config(config.relay_step, config.steps, prompts=config.eval_prompts)
    recorded = capture(host, device, held)
    picks = {
        "unet_step": recorded.for_component("unet_step")[0],  # the first device step after the hand-off
        "vae_decoder": recorded.for_component("vae_decoder")[0],
        "text_encoder": recorded.for_component("text_encoder")[0],
    }
    (out / "parity").mkdir(parents=True, exist_ok=True)
    fixtures, entries = {}, []
    for comp in config.components:
        inputs = picks[comp]
        ref = component_for(comp, device).reference(device, inputs)
        tensors = {**{f"input.{k}": np.ascontiguousarray(v) for k, v in inputs.items()},
                   **{f"reference.{k}": np.ascontiguousarray(v) for k, v in ref.items()}}
        path = out / "parity" / f"{comp}.safetensors"
        save_file(tensors, str(path))
        fixtures[comp] = tensors
        entries.append(_entry(out, path, component=comp))
    return fixtures, entries, held


def _student_section(device: Any, config: BundleConfig) -> dict[str, Any] | None:
    """The manifest's ``relay.student`` for a distilled device variant (None otherwise); its relay grid must be the bundle's.

    Raises:
        BundleError: the student was distilled for another relay step or step count than the bundle's.
    """
    info = getattr(device, "student", None)
    if info is None:
        return None
    if (info["relay_step"], info["steps"]) != (config.relay_step, config.steps):
        raise BundleError(f"device variant {config.device_variant!r} is a student distilled for relay step {info['relay_step']} of "
                          f"{info['steps']}; the bundle asks for relay step {config.relay_step} of {config.steps} "
                          f"(pass --relay-step {info['relay_step']} --steps {info['steps']})")
    from relaydiff.core.schedulers import build_scheduler
    from relaydiff.core.student import coarse_indices

    scheduler = build_scheduler("ddim", device.scheduler_config)
    scheduler.set_timesteps(config.steps)
    jumps = coarse_indices(config.steps, config.relay_step, int(info["student_steps"]))
    return {"format": info["format"], "teacher": info["teacher"], "sampler": info["sampler"],
            "student_steps": int(info["student_steps"]), "guidance_scale": float(info["guidance_scale"]),
            "relay_step": int(info["relay_step"]), "steps": int(info["steps"]),
            "step_indices": jumps, "timesteps": [int(scheduler.timesteps[i]) for i in jumps],
            "parametrization": info.get("parametrization", "eps"),
            **{key: float(info[key]) for key in ("timestep_scaling", "sigma_data") if key in info}}


def _measure(target: str, artifact: Any, fixture: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Run the artifact on its fixture where this OS can; return the figures (or why not)."""
    from relaydiff.export import get_exporter
    from relaydiff.export.base import RuntimeUnavailableError

    exporter = get_exporter(target) if target != "coreml" else None
    if exporter is None:
        from relaydiff.quantize.coreml_int8 import compression_ops

        note = {"run": False, "reason": "CoreML runs on macOS only; spec checked at build"}
        if artifact.precision == "int8":
            note["compression_ops"] = compression_ops(artifact.path)
        return note
    inputs = {k[len("input."):]: v for k, v in fixture.items() if k.startswith("input.")}
    try:
        got = exporter.run(artifact, inputs)
    except RuntimeUnavailableError as exc:
        return {"run": False, "reason": str(exc)}
    return _compare(got, fixture, artifact.tolerance)


def _compare(got: Mapping[str, np.ndarray], fixture: Mapping[str, np.ndarray], tol: Tolerance) -> dict[str, Any]:
    out: dict[str, Any] = {"run": True, "passed": True}
    for key, ref in fixture.items():
        if not key.startswith("reference."):
            continue
        name = key[len("reference."):]
        y = np.asarray(got[name])
        err = float(np.abs(y - ref).max()) if y.shape == ref.shape else float("inf")
        p = psnr_db(y, ref) if y.shape == ref.shape else float("-inf")
        ok = np.isfinite(err) and (tol.max_abs is None or err <= tol.max_abs) and (tol.min_psnr_db is None or p >= tol.min_psnr_db)
        out[name] = {"max_abs": round(err, 7), "psnr_db": round(p, 3)}
        out["passed"] = bool(out["passed"] and ok)
    return out


def _relay_figures(host: Any, device: Any, artifact: Any, config: BundleConfig, held: Any) -> dict[str, Any]:
    from relaydiff.export.bench import ArtifactSession
    from relaydiff.quantize.parity import relay_parity

    sig = artifact.signature
    run = ArtifactSession(artifact.path, artifact.exporter, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    return relay_parity(host, device, run, config=held).to_json()


def _tensor(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.concrete_shape)}


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v.tolist() if hasattr(v, "tolist") else v


def _relaydiff_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relaydiff")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------------- schema


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def schema_problems(manifest: Any, schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every place ``manifest`` breaks the manifest schema, as "path: problem" lines.

    Uses the ``jsonschema`` package when it is installed; otherwise a small validator of the subset of
    JSON Schema the manifest schema uses (type, enum, required, properties, additionalProperties,
    items, maxItems, minimum, maxLength, pattern, $ref to $defs), written because jsonschema is not a
    dependency yet.
    """
    schema = schema or load_schema()
    try:
        import jsonschema
    except ImportError:
        return _Mini(schema).check(manifest, schema, "$")
    validator = jsonschema.Draft202012Validator(schema)
    return [f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


class _Mini:
    _TYPES: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def check(self, value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
        import re

        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return self.check(value, self.root["$defs"][name], path)
        out: list[str] = []
        if "enum" in schema and value not in schema["enum"]:
            return [f"{path}: {value!r} is not one of {schema['enum']}"]
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(self._TYPES[t](value) for t in types):
                return [f"{path}: {type(value).__name__} is not of type {' or '.join(types)}"]
        if isinstance(value, dict):
            for key in schema.get("required", ()):
                if key not in value:
                    out.append(f"{path}: {key!r} is a required property")
            props = schema.get("properties", {})
            extra = schema.get("additionalProperties", True)
            for key, v in value.items():
                if key in props:
                    out += self.check(v, props[key], f"{path}.{key}")
                elif extra is False:
                    out.append(f"{path}: additional property {key!r} is not allowed")
                elif isinstance(extra, dict):
                    out += self.check(v, extra, f"{path}.{key}")
        if isinstance(value, list):
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                out.append(f"{path}: {len(value)} items; at most {schema['maxItems']} are allowed")
            if "items" in schema:
                for i, v in enumerate(value):
                    out += self.check(v, schema["items"], f"{path}[{i}]")
        if isinstance(value, str):
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                out.append(f"{path}: string longer than {schema['maxLength']}")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                out.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
        if "minimum" in schema and self._TYPES["number"](value) and value < schema["minimum"]:
            out.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
        return out


# --------------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found."""

    bundle: Path
    problems: list[str] = field(default_factory=list)  # each names the file it is about
    checked_files: int = 0
    parity: list[dict[str, Any]] = field(default_factory=list)  # one row per artifact: target, precision, component, figures

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "ok": self.ok, "problems": self.problems, "checked_files": self.checked_files,
                "parity": self.parity}


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read ``manifest.json`` (capped at MAX_MANIFEST_BYTES, JSON only).

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
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"manifest.json must hold a JSON object, got {type(data).__name__}")
    return data


def verify(folder: str | Path, *, parity: bool = True) -> VerifyReport:
    """Check a bundle folder: manifest hash and schema, every listed file's size and sha256, no unlisted files, parity.

    Raises:
        BundleError: the manifest cannot be read at all (every other finding goes into the report).
    """
    root = Path(folder).resolve()
    report = VerifyReport(root)
    manifest = read_manifest(root)
    text = (root / MANIFEST).read_bytes()
    hash_file = root / MANIFEST_HASH
    if not hash_file.is_file():
        report.problems.append(f"{MANIFEST_HASH}: missing")
    elif hash_file.read_text().split()[:1] != [hashlib.sha256(text).hexdigest()]:
        report.problems.append(f"{MANIFEST}: content does not match {MANIFEST_HASH} (the manifest was modified)")
    schema_errs = schema_problems(manifest)
    report.problems += [f"{MANIFEST}: schema: {e}" for e in schema_errs]
    if schema_errs:
        return report
    listed: set[Path] = {root / MANIFEST, root / MANIFEST_HASH}
    entries = [*manifest["parity_fixtures"]]
    for art in manifest["artifacts"]:
        entries += [art, *art["extra_files"]]
    for e in entries:
        path = _inside(root, e["file"])
        if path is None:
            report.problems.append(f"{e['file']}: path leaves the bundle folder")
            continue
        listed.add(path)
        if not path.exists():
            report.problems.append(f"{e['file']}: missing")
            continue
        digest, size = sha256_path(path)
        report.checked_files += 1
        if size != e["size"]:
            report.problems.append(f"{e['file']}: size {size} differs from the manifest's {e['size']}")
        if digest != e["sha256"]:
            report.problems.append(f"{e['file']}: sha256 {digest[:16]}... differs from the manifest's {e['sha256'][:16]}...")
    for p in sorted(root.rglob("*")):
        if p.is_file() and p not in listed and not any(d in listed for d in p.parents):
            report.problems.append(f"{p.relative_to(root).as_posix()}: not listed in the manifest")
    if parity and report.ok:
        _verify_parity(root, manifest, report)
    return report


def _inside(root: Path, rel: str) -> Path | None:
    if rel.startswith("/") or "\\" in rel or any(part in ("..", "") for part in rel.split("/")):
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) else None


def _verify_parity(root: Path, manifest: Mapping[str, Any], report: VerifyReport) -> None:
    """Re-run every artifact this OS can run on its component's fixture, against the stored torch outputs."""
    from safetensors.numpy import load_file

    fixtures = {e["component"]: load_file(str(root / e["file"])) for e in manifest["parity_fixtures"]}
    for art in manifest["artifacts"]:
        row = {k: art[k] for k in ("target", "precision", "component", "file")}
        fixture = fixtures.get(art["component"])
        if fixture is None:
            report.problems.append(f"{art['file']}: no parity fixture for component {art['component']!r}")
            continue
        tol = Tolerance(**{k: v for k, v in art["tolerance"].items() if v is not None})
        inputs = {k[len("input."):]: v for k, v in fixture.items() if k.startswith("input.")}
        try:
            got = _run(root / art["file"], art["target"], art, inputs)
        except _NoRuntime as exc:
            row["run"] = False
            row["reason"] = str(exc)
            report.parity.append(row)
            continue
        row.update(_compare(got, fixture, tol))
        report.parity.append(row)
        if not row["passed"]:
            report.problems.append(f"{art['file']}: parity outside tolerance ({tol.describe()}): {row}")


class _NoRuntime(Exception):
    pass


def _run(path: Path, target: str, art: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [t["name"] for t in art["outputs"]]
    if target == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: np.ascontiguousarray(inputs[i.name]) for i in session.get_inputs()}
        return dict(zip(names, session.run(names, feed), strict=True))
    if target == "executorch":
        import torch
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(path).load_method("forward")
        outs = method.execute([torch.from_numpy(np.ascontiguousarray(inputs[t["name"]])) for t in art["inputs"]])
        return {n: o.detach().numpy().copy() for n, o in zip(names, outs, strict=True)}
    from relaydiff.export.coreml import CoreMLExporter

    reason = CoreMLExporter().runtime_unavailable_reason()
    if reason is not None:
        raise _NoRuntime(reason)
    import coremltools as ct

    out = ct.models.MLModel(str(path)).predict(dict(inputs))
    return {n: np.asarray(out[n]) for n in names}
