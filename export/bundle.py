"""Mobile bundles: the device half of a family exported per target and precision, with a verifiable manifest.

A bundle folder holds ``<target>/<precision>/<files>``, ``parity/<component>.safetensors`` (inputs
drawn from a held-out relay and the torch fp32 outputs on them), ``manifest.json`` and
``manifest.sha256``; :func:`build` also writes ``<folder>.zip``. The manifest (schema:
``relaydiff/runtime/manifest.schema.json``) says, for every artifact, its file, sha256, size, target,
precision, component, inputs/outputs, the relay-step range its INT8 calibration covered, the parity
measured at build time, and for the whole bundle the family id and config hash, the scheduler config
and timestep grid, the latent shape and VAE scaling, and tool versions.

Reading and verifying a bundle is the runtime's job (:mod:`relaydiff.runtime.bundle`, re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.export.base import UnknownNameError
from relaydiff.runtime.bundle import (  # noqa: F401  (re-exported: the read side of a bundle lives in the runtime)
    CACHE_COMPONENTS,
    COMPONENTS,
    MANIFEST,
    MANIFEST_HASH,
    MAX_MANIFEST_BYTES,
    PRECISIONS,
    TARGETS,
    BundleError,
    VerifyReport,
    family_config_hash,
    fixture_parity,
    read_manifest,
    schema_problems,
    sha256_path,
    verify,
)
from relaydiff.runtime.manifest import (
    ArtifactEntry,
    BundleStudent,
    CacheSection,
    FamilySection,
    FileEntry,
    LatentSection,
    Manifest,
    RelaySection,
    SchedulerSection,
    SkippedEntry,
    TensorEntry,
)

# INT8 method per component for ONNX: static QDQ (relay-aware calibration) for the UNet; dynamic for the
# decoder and text encoder (static INT8 of the tiny decoder cost ~20 dB of image PSNR, dynamic none).
ONNX_INT8_METHODS = {"unet_step": "static", "vae_decoder": "dynamic", "text_encoder": "dynamic"}
# Activations of the static ONNX INT8 unet_step. 16-bit activations are the default: on the trained family the
# CFG step eps_u + g (eps_c - eps_u) multiplies the 8-bit activation error of the two passes by g, and uint8
# activations gave a relayed image of 21 dB against fp32 (W8A16: 44 dB; the bar is 30 dB). Weights are
# int8 either way, so the size gain is the same; W8A16 runs as Q/DQ + float kernels on a CPU (slower), and
# natively on phone NPUs that take 16-bit activations.
ONNX_ACTIVATIONS = {"w8a16": "QInt16", "w8a8": "QUInt8"}


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
    cache: bool = False  # also export unet_step_full/unet_step_cached (fp32) and the family's cache policy (docs/cache.md)
    cache_mechanism: str = "reuse"  # which committed policy (<family>/cache_policy/<mechanism>.json) goes in the bundle

    def __post_init__(self) -> None:
        check_names("target", self.targets, TARGETS)
        check_names("precision", self.precisions, PRECISIONS)
        check_names("component", self.components, COMPONENTS + CACHE_COMPONENTS)
        check_names("cache mechanism", (self.cache_mechanism,), ("reuse", "forecast"))
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


def _entry(root: Path, path: Path, component: str | None = None) -> FileEntry:
    digest, size = sha256_path(path)
    return FileEntry(path.relative_to(root).as_posix(), digest, size, component)


# ---------------------------------------------------------------------------------------------------- build


def build(config: BundleConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export, quantize, measure and hash every (target, precision, component); write the bundle. Returns the manifest's JSON.

    Raises:
        BundleError: the output folder is not empty.
        ExportError: an export or a quantization failed.
    """
    from tqdm.auto import tqdm

    from relaydiff.core import family
    from relaydiff.core.schedulers import build_scheduler
    from relaydiff.export.base import tool_versions

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
    if config.cache:
        config = replace(config, components=tuple(dict.fromkeys((*config.components, *CACHE_COMPONENTS))))
    student_skips: list[SkippedEntry] = []
    if student is not None and any(c in CACHE_COMPONENTS for c in config.components):  # recorded as skipped, not built
        why = "a distilled student's bundle has no cached-step graphs (a student caches across its jumps in torch only)"
        student_skips = [SkippedEntry(t, p, why, c) for t in config.targets for p in config.precisions
                         for c in config.components if c in CACHE_COMPONENTS]
        config = replace(config, components=tuple(c for c in config.components if c not in CACHE_COMPONENTS))
    policy = _cache_policy(device, config) if any(c in CACHE_COMPONENTS for c in config.components) else None
    branch = policy[1].cache_branch if policy is not None and policy[1] is not None else 0
    if config.executorch_float and "executorch" in config.targets and "int8" in config.precisions:
        from relaydiff.export.components import component_for

        _check_module_paths(component_for("unet_step", device).module(device), config.executorch_float)
    out.mkdir(parents=True, exist_ok=True)

    fixtures, fixture_entries, held_out = _parity_fixtures(host, device, config, out, branch)
    calibration = None
    if "int8" in config.precisions and ("onnx" in config.targets or "executorch" in config.targets):
        from relaydiff.quantize.calibration import CalibrationConfig, capture

        say(f"capturing relay-aware calibration: host [0, {config.relay_step}), device [{config.relay_step}, {config.steps})")
        calibration = capture(host, device, CalibrationConfig(relay_steps=(config.relay_step,), steps=config.steps,
                                                              prompts=config.calibration_prompts), progress=progress)

    jobs = [(t, p, c) for t in config.targets for p in config.precisions for c in config.components]
    artifacts: list[ArtifactEntry] = []
    skipped: list[SkippedEntry] = list(student_skips)
    scratch = tempfile.mkdtemp(prefix="relaydiff-bundle-")
    fp32_onnx: dict[str, Any] = {"_scratch": scratch}
    try:
        for target, precision, comp in tqdm(jobs, desc="bundle", disable=not progress):
            sub = out / target / precision
            made = _make(target, precision, comp, device, sub, config, calibration, fp32_onnx, branch)
            if isinstance(made, str):
                skipped.append(SkippedEntry(target, precision, made, comp))
                say(f"skipped {target}/{precision}/{comp}: {made}")
                continue
            artifact, method = made
            parity = _measure(target, artifact, fixtures[comp])
            if comp == "unet_step" and target in ("onnx", "executorch") and precision == "int8":
                parity["relay"] = _relay_figures(host, device, artifact, config, held_out)
            files = [f for role, f in artifact.files.items() if f != artifact.path]
            extra = [_entry(out, f) for f in (*files, artifact.metadata_path) if f.exists()]
            sig = artifact.signature
            main = _entry(out, artifact.path)
            artifacts.append(ArtifactEntry(
                file=main.file, sha256=main.sha256, size=main.size, target=target, precision=precision, component=comp,
                inputs=tuple(_tensor(s) for s in sig.inputs), outputs=tuple(_tensor(s) for s in sig.outputs),
                extra_files=tuple(extra), tolerance=artifact.tolerance, calibration=artifact.metadata.get("calibration"),
                parity=parity, method=method, compute_precision=artifact.precision if target == "coreml" else precision,
            ))
            say(f"{target}/{precision}/{comp}: {artifact.path.name} {parity}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    scheduler = build_scheduler("ddim", device.scheduler_config)
    scheduler.set_timesteps(config.steps)
    from relaydiff.export.components import family_dims

    d = family_dims(device)
    config_hash, config_files = family_config_hash(dev_ref.root)
    cache_section = _write_policy(out, policy, config, branch) if policy is not None else None
    shift = getattr(device.vae.config, "shift_factor", None)
    manifest = Manifest(
        family=FamilySection(device.family_id, config_hash, dev_ref.variant, host_ref.variant, tuple(config_files)),
        scheduler=SchedulerSection("ddim", config.steps, tuple(int(t) for t in scheduler.timesteps),
                                   {k: _plain(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}),
        latent=LatentSection((1, d["C"], d["h"], d["w"]), float(device.vae.config.scaling_factor),
                             None if shift is None else float(shift), (1, 3, d["H"], d["W"])),
        relay=RelaySection(config.relay_step, config.steps, (config.relay_step, config.steps), student),
        artifacts=tuple(artifacts),
        parity_fixtures=tuple(fixture_entries),
        tools={**tool_versions(), "relaydiff": _relaydiff_version()},
        skipped=tuple(skipped),
        cache=cache_section,
    ).to_json()
    problems = schema_problems(manifest)
    if problems:
        raise BundleError("the manifest built does not match its schema", problems)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"  # NaN/Infinity are not JSON: fail here
    (out / MANIFEST).write_text(text)
    (out / MANIFEST_HASH).write_text(hashlib.sha256(text.encode()).hexdigest() + "  " + MANIFEST + "\n")
    if config.zip:
        shutil.make_archive(str(out), "zip", root_dir=out)
    return manifest


def _component(comp: str, device: Any, branch: int) -> Any:
    """The component ``comp`` in the form ``device`` needs; the cached-step pair split at ``branch``."""
    from relaydiff.export.components import component_for

    component = component_for(comp, device)
    return replace(component, cache_branch=branch) if comp in CACHE_COMPONENTS else component


def _cache_policy(device: Any, config: BundleConfig) -> tuple[Path, Any] | tuple[None, None]:
    """(policy JSON path, its config) of the family's committed policy for the mechanism, or (None, None) without one.

    Raises:
        RelaydiffError: the policy was trained for another family (naming both ids) or UNet architecture.
    """
    from relaydiff.core.caching.device import family_policy_path
    from relaydiff.core.caching.policy import check_policy_for, load_policy

    path = family_policy_path(device.ref.root, config.cache_mechanism)
    if not path.is_file():
        return None, None
    _, policy_config = load_policy(path)
    check_policy_for(policy_config, device, str(path))
    return path, policy_config


def _write_policy(out: Path, policy: tuple[Path, Any] | tuple[None, None], config: BundleConfig, branch: int) -> CacheSection:
    """Copy the policy files into ``out/cache_policy/`` and describe them (no policy: the device spends budgets uniformly)."""
    from relaydiff.core.caching.policy import policy_paths

    path, policy_config = policy
    if path is None or policy_config is None:
        return CacheSection(config.cache_mechanism, branch)
    folder = out / "cache_policy"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for src in policy_paths(path):
        shutil.copyfile(src, folder / src.name)
        entries.append(_entry(out, folder / src.name))
    return CacheSection(policy_config.mechanism, branch, entries[0], entries[1], policy_config.family_id)


def _make(
    target: str, precision: str, comp: str, device: Any, sub: Path, config: BundleConfig, calibration: Any, fp32_onnx: dict[str, Any],
    branch: int = 0,
) -> tuple[Any, str] | str:
    """Export one artifact; return (artifact, method note), or the reason it is skipped."""
    from relaydiff.export import get_exporter

    if comp in CACHE_COMPONENTS and precision != "fp32":
        return "the cached-step graphs are exported at fp32 only (INT8 calibration covers unet_step)"
    component = _component(comp, device, branch)
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


def _parity_fixtures(host: Any, device: Any, config: BundleConfig, out: Path,
                     branch: int = 0) -> tuple[dict[str, dict[str, np.ndarray]], list[FileEntry], Any]:
    """One held-out relay's inputs per component with torch fp32 outputs, saved as safetensors.

    ``unet_step_full`` takes the first device step's inputs; ``unet_step_cached`` the second step's, with the deep
    features the torch full step computed at the first (what a reuse schedule hands it).
    """
    from safetensors.numpy import save_file

    from relaydiff.quantize.calibration import capture
    from relaydiff.quantize.parity import eval_config

    held = eval_config(config.relay_step, config.steps, prompts=config.eval_prompts)
    recorded = capture(host, device, held)
    picks = {
        "unet_step": recorded.for_component("unet_step")[0],  # the first device step after the hand-off
        "vae_decoder": recorded.for_component("vae_decoder")[0],
        "text_encoder": recorded.for_component("text_encoder")[0],
    }
    if any(c in CACHE_COMPONENTS for c in config.components):
        first, second = recorded.for_component("unet_step")[:2]
        deep = _component("unet_step_full", device, branch).reference(device, first)["deep_features"]
        picks.update({"unet_step_full": first, "unet_step_cached": {**second, "deep_features": deep}})
    (out / "parity").mkdir(parents=True, exist_ok=True)
    fixtures, entries = {}, []
    for comp in config.components:
        inputs = picks[comp]
        ref = _component(comp, device, branch).reference(device, inputs)
        tensors = {**{f"input.{k}": np.ascontiguousarray(v) for k, v in inputs.items()},
                   **{f"reference.{k}": np.ascontiguousarray(v) for k, v in ref.items()}}
        path = out / "parity" / f"{comp}.safetensors"
        save_file(tensors, str(path))
        fixtures[comp] = tensors
        entries.append(_entry(out, path, component=comp))
    return fixtures, entries, held


def _student_section(device: Any, config: BundleConfig) -> BundleStudent | None:
    """The manifest's ``relay.student`` for a distilled device variant (None otherwise); its relay grid must be the bundle's.

    Raises:
        BundleError: the student was distilled for another relay step or step count than the bundle's.
    """
    info = device.student
    if info is None:
        return None
    if (info.relay_step, info.steps) != (config.relay_step, config.steps):
        raise BundleError(f"device variant {config.device_variant!r} is a student distilled for relay step {info.relay_step} of "
                          f"{info.steps}; the bundle asks for relay step {config.relay_step} of {config.steps} "
                          f"(pass --relay-step {info.relay_step} --steps {info.steps})")
    from relaydiff.core.schedulers import build_scheduler
    from relaydiff.core.student import coarse_indices

    scheduler = build_scheduler("ddim", device.scheduler_config)
    scheduler.set_timesteps(config.steps)
    jumps = coarse_indices(config.steps, config.relay_step, info.student_steps)
    return BundleStudent(info, tuple(jumps), tuple(int(scheduler.timesteps[i]) for i in jumps))


def _measure(target: str, artifact: Any, fixture: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Run the artifact on its fixture where this OS can; return the figures (or why not)."""
    from relaydiff.export import get_exporter
    from relaydiff.runtime.sessions import RuntimeUnavailableError

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
    return fixture_parity(got, fixture, artifact.tolerance)


def _relay_figures(host: Any, device: Any, artifact: Any, config: BundleConfig, held: Any) -> dict[str, Any]:
    from relaydiff.quantize.parity import relay_parity
    from relaydiff.runtime.sessions import ArtifactSession

    sig = artifact.signature
    run = ArtifactSession(artifact.path, artifact.exporter, [s.name for s in sig.inputs], [s.name for s in sig.outputs])
    return relay_parity(host, device, run, config=held).to_json()


def _tensor(spec: Any) -> TensorEntry:
    return TensorEntry(spec.name, spec.dtype, spec.concrete_shape)


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
