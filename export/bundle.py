"""Mobile bundles: the device half of a family exported per target and precision, with a verifiable manifest.

A bundle folder holds ``<target>/<precision>/<files>``, ``parity/<component>.safetensors`` (inputs
drawn from a held-out relay and the torch fp32 outputs on them), ``tokenizer/`` (the family's tokenizer
files), ``manifest.json`` and ``manifest.sha256``; :func:`build` also writes ``<folder>/<folder name>.zip``.
The manifest (schema: ``relaydiff/runtime/manifest.schema.json``, format version 2) says, for every
artifact, its file, sha256, size, target, precision, component, inputs/outputs, the relay-step range its
INT8 calibration covered, the parity measured at build time and its gates and status
(:mod:`relaydiff.runtime.gates`); and for the whole bundle the family id and config hash, the scheduler
config and timestep grid, the latent shape and VAE scaling, the tokenizer, the ``device_loop`` (the device
half's sampler constants per timestep, CFG order and formula, inputs, decode: docs/device_loop.md), the
runtime requirements per target, and tool versions; ``safety_checker`` (the family's StableDiffusionSafetyChecker,
exported fp32 per target, with ``feature_extractor/preprocessor_config.json``; null without one) and ``denylist``
(``safety/denylist.txt``; null without): :mod:`relaydiff.runtime.safety`; with ``layout="optimum"`` also
``optimum/``, loadable by optimum's ORTStableDiffusionPipeline (:mod:`relaydiff.export.optimum_layout`).

Reading and verifying a bundle is the runtime's job (:mod:`relaydiff.runtime.bundle`, re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

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
    SAFETY_COMPONENT,
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
from relaydiff.runtime.gates import ACCURACY_PROMPTS, Gate, accuracy_gate, gate_names, per_call_gate, relay_gate, status_of
from relaydiff.runtime.manifest import (
    LCM_EPS,
    ArtifactEntry,
    BundleStudent,
    DeviceLoop,
    CacheSection,
    FamilySection,
    FileEntry,
    LatentSection,
    DenylistSection,
    LoopStep,
    Manifest,
    OptimumLayoutSection,
    RelaySection,
    RuntimeRequirement,
    SafetyCheckerSection,
    SchedulerSection,
    SkippedEntry,
    TensorEntry,
    TokenizerSection,
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


LAYOUTS = ("relaydiff", "optimum")  # what bundle build --layout takes


@dataclass(frozen=True)
class BundleConfig:
    """What :func:`build` makes."""

    family: Path  # family folder (host and device variants)
    out: Path  # bundle folder (must be empty or absent); the zip goes inside it as <out>/<out name>.zip
    targets: tuple[str, ...] = ("onnx",)  # subset of TARGETS
    precisions: tuple[str, ...] = ("fp32",)  # subset of PRECISIONS
    relay_step: int = 8  # k: the device runs [k, N); INT8 calibration is drawn from these steps
    steps: int = 25  # N
    components: tuple[str, ...] = COMPONENTS  # which device components to export
    calibration_prompts: int | tuple[str, ...] = 48  # a number of world prompts (4 under-cover the trained device, README),
    # or the user's own prompts (bundle build --calibration-prompts FILE)
    calibration_sampler: str | None = None  # sampler of the calibration relays; None: the family's scheduler
    calibration_guidance: float | None = None  # CFG scale of the calibration relays; None: the family's default (5.0 if none)
    allow_failing: bool = False  # keep artifacts that fail their gates (status "failed", refused by the runtime) instead of failing
    accuracy_prompts: int = ACCURACY_PROMPTS  # prompts of the INT8 prompt-accuracy gate (trained families only)
    eval_prompts: int = 2  # held-out relays for the build-time parity figures
    coreml_target: str = "iOS18"  # CoreML deployment target
    zip: bool = True  # also write <out>/<out name>.zip
    device_variant: str | None = None  # the family's device UNet variant (e.g. "student"); None: its default device
    onnx_int8: str = "w8a16"  # ONNX static INT8 of unet_step: int8 weights with 16-bit ("w8a16") or 8-bit ("w8a8") activations
    executorch_float: tuple[str, ...] | None = None  # ExecuTorch INT8: module paths kept float; None: DEFAULT_FLOAT_MODULES
    cache: bool = False  # also export unet_step_full/unet_step_cached (fp32) and the family's cache policy (docs/cache.md)
    cache_mechanism: str = "reuse"  # which committed policy (<family>/cache_policy/<mechanism>.json) goes in the bundle
    safety_checker: bool = True  # export the family's safety checker (fp32, every target) when it has one (runtime.safety)
    denylist: Path | None = None  # a prompt denylist file to ship as safety/denylist.txt (one word or phrase a line)
    layout: str = "relaydiff"  # "optimum": also write optimum/, the layout optimum's ORTStableDiffusionPipeline loads

    def __post_init__(self) -> None:
        check_names("target", self.targets, TARGETS)
        check_names("precision", self.precisions, PRECISIONS)
        check_names("component", self.components, COMPONENTS + CACHE_COMPONENTS + (SAFETY_COMPONENT,))
        check_names("cache mechanism", (self.cache_mechanism,), ("reuse", "forecast"))
        check_names("ONNX INT8 scheme", (self.onnx_int8,), tuple(ONNX_ACTIVATIONS))
        check_names("layout", (self.layout,), LAYOUTS)
        if not 0 <= self.relay_step < self.steps:
            raise RelaydiffError(f"relay step {self.relay_step!r} is outside [0, {self.steps}) (steps = {self.steps})")
        cp = self.calibration_prompts
        if isinstance(cp, bool) or (isinstance(cp, int) and cp < 1) or (isinstance(cp, tuple) and not cp):
            raise RelaydiffError(f"calibration prompts must be a positive number of world prompts or a non-empty prompt list, got {cp!r}")
        if self.calibration_sampler is not None:
            from relaydiff.core.schedulers import SAMPLERS

            check_names("calibration sampler", (self.calibration_sampler,), tuple(SAMPLERS))
        g = self.calibration_guidance
        if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g > 1.0):
            raise RelaydiffError(f"calibration guidance must be a finite number > 1 (unet_step computes CFG inside), got {g!r}")
        if isinstance(self.accuracy_prompts, bool) or not isinstance(self.accuracy_prompts, int) or self.accuracy_prompts < 1:
            raise RelaydiffError(f"accuracy prompts must be a positive integer, got {self.accuracy_prompts!r}")
        if self.denylist is not None:
            from relaydiff.runtime.safety import read_denylist

            read_denylist(self.denylist)  # a bad file fails before any export


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


class GateFailure(BundleError):
    """Artifacts failed their gates and the build was not asked to keep them (exit status 1: a check failed)."""

    exit_code = 1


@dataclass(frozen=True)
class AccuracyCheck:
    """How the INT8 prompt-accuracy gate scores images: the prompts and a scorer (the CLI passes relaydiff.scorer's;
    the export layer cannot import the apps)."""

    prompts: tuple[str, ...]
    correct: Callable[[np.ndarray, str], bool]  # (uint8 HWC image, prompt) -> whether the image shows the prompt


def build(config: BundleConfig, *, progress: bool = True, log: Callable[[str], None] | None = None,
          accuracy: AccuracyCheck | None = None) -> dict[str, Any]:
    """Export, quantize, measure, gate and hash every (target, precision, component); write the bundle. Returns the manifest's JSON.

    Every artifact is held to the gates of :mod:`relaydiff.runtime.gates`. When one fails and
    ``config.allow_failing`` is off, nothing is left behind (the output folder is removed, or emptied when it
    existed) and :class:`GateFailure` is raised; with it on, the artifact is kept with status ``failed``.

    Raises:
        BundleError: the output folder is not empty, or the family cannot be described by a device loop.
        RelaydiffError: ``config.family`` is a plain pipeline folder (no family.json: no device variant).
        GateFailure: an artifact failed a gate (``allow_failing`` off).
        ExportError: an export or a quantization failed.
    """
    out = config.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"bundle folder '{out}' is not empty")
    existed = out.exists()
    try:
        return _build(config, progress, log or (lambda _m: None), accuracy)
    except BaseException:
        if existed:  # it was empty: leave it empty
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build(config: BundleConfig, progress: bool, say: Callable[[str], None], accuracy: AccuracyCheck | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from relaydiff.core import family
    from relaydiff.core.schedulers import build_scheduler
    from relaydiff.export.base import tool_versions

    out = config.out
    # a plain pipeline folder has one UNet: resolving it for both roles would export the host UNet as the device model
    family.require_family(config.family, needed="a device variant to export (and a host for calibration)")
    host_ref = family.resolve(config.family, role="host")
    dev_ref = family.resolve(config.family, config.device_variant, role="device")
    family.check_pair(host_ref, dev_ref)
    style = family.pipeline_style(Path(dev_ref.root))
    if style != "sd":  # the manifest, device loop, gates and tokenizer section describe one-encoder diffusion families
        raise BundleError(f"bundle build exports SD 1.x/2.x-style families only; '{config.family}' is {style}-style "
                          "(its unet_step and vae_decoder export with `relaydiff export`; docs/bundle.md)")
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
    config = _with_safety(config, dev_ref.root)
    loop_steps = _loop_steps(device, config)  # before any export: a family no device loop can describe fails first
    out.mkdir(parents=True, exist_ok=True)

    fixtures, fixture_entries, held_out = _parity_fixtures(host, device, config, out, branch)
    calibration = None
    if "int8" in config.precisions and ("onnx" in config.targets or "executorch" in config.targets):
        from relaydiff.quantize.calibration import capture

        cal_config = calibration_config(config, device)
        say(f"capturing relay-aware calibration: host [0, {config.relay_step}), device [{config.relay_step}, {config.steps}), "
            f"{cal_config.prompts} {'listed' if cal_config.prompt_list else 'world'} prompts, {cal_config.sampler}, "
            f"CFG {cal_config.guidance_scale:g}")
        calibration = capture(host, device, cal_config, progress=progress)

    jobs = [(t, p, c) for t in config.targets for p in config.precisions for c in config.components if c != SAFETY_COMPONENT]
    if SAFETY_COMPONENT in config.components:  # one fp32 checker per target: the flag's threshold at 0 is not for INT8 to move
        jobs += [(t, "fp32", SAFETY_COMPONENT) for t in config.targets]
    made: dict[tuple[str, str, str], tuple[Any, str, dict[str, Any]]] = {}
    skipped: list[SkippedEntry] = list(student_skips)
    scratch = tempfile.mkdtemp(prefix="relaydiff-bundle-")
    fp32_onnx: dict[str, Any] = {"_scratch": scratch}
    try:
        for target, precision, comp in tqdm(jobs, desc="bundle", disable=not progress):
            sub = out / target / precision
            result = _make(target, precision, comp, device, sub, config, calibration, fp32_onnx, branch)
            if isinstance(result, str):
                skipped.append(SkippedEntry(target, precision, result, comp))
                say(f"skipped {target}/{precision}/{comp}: {result}")
                continue
            artifact, method = result
            made[(target, precision, comp)] = (artifact, method, _measure(target, artifact, fixtures[comp]))
        gates = _gates(host, device, config, made, held_out, accuracy, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    artifacts: list[ArtifactEntry] = []
    for (target, precision, comp), (artifact, method, parity) in made.items():
        files = [f for role, f in artifact.files.items() if f != artifact.path]
        extra = [_entry(out, f) for f in (*files, artifact.metadata_path) if f.exists()]
        sig = artifact.signature
        main = _entry(out, artifact.path)
        own = gates[(target, precision, comp)]
        artifacts.append(ArtifactEntry(
            file=main.file, sha256=main.sha256, size=main.size, target=target, precision=precision, component=comp,
            inputs=tuple(_tensor(s) for s in sig.inputs), outputs=tuple(_tensor(s) for s in sig.outputs),
            extra_files=tuple(extra), tolerance=artifact.tolerance, calibration=artifact.metadata.get("calibration"),
            parity=parity, method=method, compute_precision=artifact.precision if target == "coreml" else precision,
            gates=own, status=status_of(own),
        ))
        say(f"{target}/{precision}/{comp}: {artifact.path.name} {status_of(own)}: " + "; ".join(g.describe() for g in own))
    failed = [a for a in artifacts if a.status == "failed"]
    if failed and not config.allow_failing:
        raise GateFailure("the bundle was not written: artifacts failed their gates (bundle build --allow-failing keeps them, "
                          "marked 'failed', and the runtime refuses them)",
                          [f"{a.name}: " + "; ".join(g.describe() for g in a.failed_gates()) for a in failed])
    for a in failed:
        say(f"kept FAILED artifact {a.name} (--allow-failing): the runtime refuses to load it")

    scheduler = build_scheduler("ddim", device.scheduler_config)
    scheduler.set_timesteps(config.steps)
    from relaydiff.export.components import family_dims

    d = family_dims(device)
    config_hash, config_files = family_config_hash(dev_ref.root)
    cache_section = _write_policy(out, policy, config, branch) if policy is not None else None
    shift = getattr(device.vae.config, "shift_factor", None)
    versions = {**tool_versions(), "relaydiff": _relaydiff_version()}
    step_entry = next((a for a in artifacts if a.component == "unet_step"), None)
    manifest = Manifest(
        family=FamilySection(device.family_id, config_hash, dev_ref.variant, host_ref.variant, tuple(config_files)),
        scheduler=SchedulerSection("ddim", config.steps, tuple(int(t) for t in scheduler.timesteps),
                                   {k: _plain(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}),
        latent=LatentSection((1, d["C"], d["h"], d["w"]), float(device.vae.config.scaling_factor),
                             None if shift is None else float(shift), (1, 3, d["H"], d["W"])),
        relay=RelaySection(config.relay_step, config.steps, (config.relay_step, config.steps), student),
        artifacts=tuple(artifacts),
        parity_fixtures=tuple(fixture_entries),
        tools=versions,
        skipped=tuple(skipped),
        tokenizer=_copy_tokenizer(device, dev_ref.root, out),
        device_loop=None if step_entry is None else DeviceLoop(
            "ddim", "epsilon", tuple(int(t) for t in scheduler.timesteps), loop_steps, step_entry.inputs,
            cfg=step_entry.input("guidance_scale") is not None,
            eps_transform=LCM_EPS if loop_steps and loop_steps[0].c_skip is not None else None),
        requirements=_requirements(config, versions),
        cache=cache_section,
        safety_checker=_write_safety(device, dev_ref.root, out) if SAFETY_COMPONENT in config.components else None,
        denylist=_write_denylist(config.denylist, out) if config.denylist is not None else None,
        optimum_layout=_write_optimum(device, dev_ref.root, scheduler, out, student) if config.layout == "optimum" else None,
    ).to_json()
    problems = schema_problems(manifest)
    if problems:
        raise BundleError("the manifest built does not match its schema", problems)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"  # NaN/Infinity are not JSON: fail here
    (out / MANIFEST).write_text(text)
    (out / MANIFEST_HASH).write_text(hashlib.sha256(text.encode()).hexdigest() + "  " + MANIFEST + "\n")
    if config.zip:
        with tempfile.TemporaryDirectory(prefix="relaydiff-zip-") as tmp:  # built beside, then moved in: it cannot hold itself
            made_zip = shutil.make_archive(str(Path(tmp) / out.resolve().name), "zip", root_dir=out)
            shutil.move(made_zip, archive_path(out))
    return manifest


def archive_path(out: Path) -> Path:
    """Where :func:`build` writes the bundle's zip: inside the bundle folder, named after it."""
    return out / f"{out.resolve().name}.zip"


def calibration_config(config: BundleConfig, device: Any) -> Any:
    """The relay-aware calibration of ``config``: its prompts (a count of world prompts or the user's list), sampler and
    guidance, the last two defaulting to the family's (its scheduler; its default guidance, else 5)."""
    from relaydiff.quantize.calibration import CalibrationConfig

    listed = config.calibration_prompts if isinstance(config.calibration_prompts, tuple) else ()
    count = config.calibration_prompts if isinstance(config.calibration_prompts, int) else len(listed)
    return CalibrationConfig(relay_steps=(config.relay_step,), steps=config.steps,
                             prompts=len(listed) if listed else count, prompt_list=listed,
                             sampler=config.calibration_sampler or family_sampler(device),
                             guidance_scale=float(config.calibration_guidance or family_guidance(device)))


def family_sampler(device: Any) -> str:
    """The relaydiff sampler of the family's scheduler config (its ``_class_name``), else ddim."""
    from relaydiff.core.schedulers import SAMPLERS

    cls = dict(device.scheduler_config).get("_class_name")
    return next((s.name for s in SAMPLERS.values() if s.class_name == cls and not s.overrides), "ddim")


def family_guidance(device: Any) -> float:
    """The family's default guidance scale (``family.json``: ``guidance_scale``), else 5.0 (the relay's default)."""
    path = Path(device.ref.root) / "family.json"
    try:
        g = json.loads(path.read_text()).get("guidance_scale") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        g = None
    return float(g) if isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g > 1 else 5.0


def _trained(device: Any) -> str | None:
    """Why the family cannot be scored for prompt accuracy (random weights), else None."""
    path = Path(device.ref.root) / "family.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        info = {}
    if info.get("random_weights") or "training" not in info:
        return "the family has random weights (family.json: no 'training' record): prompt accuracy would be vacuous"
    return None


def _gates(host: Any, device: Any, config: BundleConfig, made: Mapping[tuple[str, str, str], tuple[Any, str, dict[str, Any]]],
           held: Any, accuracy: AccuracyCheck | None, say: Callable[[str], None]) -> dict[tuple[str, str, str], tuple[Gate, ...]]:
    """The gates of every artifact made (relay figures also go into its parity record)."""
    out: dict[tuple[str, str, str], tuple[Gate, ...]] = {}
    untrained = _trained(device)
    for key, (artifact, _method, parity) in made.items():
        target, precision, comp = key
        names = gate_names(target, precision, comp)
        gates = [per_call_gate(precision, artifact.tolerance, parity)]
        if "relay_image_psnr_db" not in names:
            out[key] = tuple(gates)
            continue
        decoder_made = made.get((target, precision, "vae_decoder"))
        unet, decoder = _session(artifact), None if decoder_made is None else _session(decoder_made[0])
        which = f"{target}/{precision} decoder" if decoder is not None else "torch fp32 decoder"
        say(f"gate {'/'.join(key)}: relaying {held.prompts} held-out prompts ({which})")
        from relaydiff.quantize.parity import relay_parity

        figures = relay_parity(host, device, unet, decoder=decoder, config=held).to_json()
        parity["relay"] = {**figures, "decoder": which}
        gates.append(relay_gate(precision, figures.get("image_psnr_db"),
                                f"worst of {held.prompts} held-out relays at k = {config.relay_step} of {config.steps}, {which}"))
        if "prompt_accuracy_points" in names:
            if untrained is not None or accuracy is None:
                gates.append(accuracy_gate(None, None, 0, untrained or "no scorer given (library call without AccuracyCheck)"))
            else:
                from relaydiff.quantize.parity import relay_images

                prompts = accuracy.prompts[: config.accuracy_prompts]
                say(f"gate {'/'.join(key)}: prompt accuracy over {len(prompts)} prompts")
                ref, got = relay_images(host, device, unet, decoder, prompts, config.relay_step, config.steps)
                score = [100.0 * float(np.mean([accuracy.correct(im, p) for im, p in zip(ims, prompts, strict=True)])) for ims in (ref, got)]
                gates.append(accuracy_gate(score[0], score[1], len(prompts), f"{which}, seeds 0..{len(prompts) - 1}"))
        out[key] = tuple(gates)
    return out


def _session(artifact: Any) -> Any:
    from relaydiff.runtime.sessions import ArtifactSession

    sig = artifact.signature
    return ArtifactSession(artifact.path, artifact.exporter, [s.name for s in sig.inputs], [s.name for s in sig.outputs])


def _loop_steps(device: Any, config: BundleConfig) -> tuple[LoopStep, ...]:
    """The device calls with their DDIM constants (a teacher: every grid step, so any hand-off k finishes; a student: its jumps
    from the bundle's k), as diffusers' DDIMScheduler.step
    computes them (a_prev at t - num_train_timesteps // N, final_alpha_cumprod below 0) or, for a student, its jumps.

    Raises:
        BundleError: the family's schedule is one the device loop does not describe (not epsilon, clipping, thresholding).
    """
    import torch

    from relaydiff.core.schedulers import build_scheduler

    sc = dict(device.scheduler_config)
    unsupported = [f"{k}={sc.get(k)!r}" for k, ok in (("prediction_type", sc.get("prediction_type", "epsilon") == "epsilon"),
                                                      ("clip_sample", not sc.get("clip_sample")), ("thresholding", not sc.get("thresholding")))
                   if not ok]
    if unsupported:
        raise BundleError(f"the family's scheduler has {', '.join(unsupported)}; a bundle's device loop is DDIM on epsilon "
                          "predictions without clipping or thresholding")
    scheduler = build_scheduler("ddim", sc)
    scheduler.set_timesteps(config.steps)
    ts = [int(t) for t in scheduler.timesteps]
    ac = scheduler.alphas_cumprod.float()
    final = float(torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32))
    info = device.student
    if info is None:
        gap = scheduler.config.num_train_timesteps // config.steps
        return tuple(LoopStep(i, ts[i], float(ac[ts[i]]), float(ac[ts[i] - gap]) if ts[i] - gap >= 0 else final)
                     for i in range(config.steps))  # every step: a hand-off at any k finishes from the same table
    from relaydiff.core.student import coarse_indices, jump_alphas, lcm_scalings

    idx = coarse_indices(config.steps, config.relay_step, info.student_steps)
    lcm = info.parametrization == "lcm" and info.timestep_scaling is not None and info.sigma_data is not None
    steps = []
    for i, (t, a_t, a_s) in zip(idx, jump_alphas(torch.tensor(ts), idx, sc), strict=True):
        c = tuple(float(v) for v in lcm_scalings(float(t), info.timestep_scaling, info.sigma_data)) if lcm else (None, None)
        steps.append(LoopStep(i, t, a_t, a_s, *c))
    return tuple(steps)


TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.json",
                   "added_tokens.json")  # the text files transformers' CLIP tokenizers read; nothing pickled


def _copy_tokenizer(device: Any, root: Path, out: Path) -> TokenizerSection:
    """Copy the family's tokenizer files into ``out/tokenizer`` and describe them.

    Raises:
        BundleError: the family has no tokenizer folder with those files.
    """
    src = root / "tokenizer"
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not files:
        raise BundleError(f"the family has no tokenizer files in '{src.name}/' (expected some of {', '.join(TOKENIZER_FILES)})")
    dst = out / "tokenizer"
    dst.mkdir()
    for f in files:
        shutil.copyfile(f, dst / f.name)
    tok = device.tokenizer
    return TokenizerSection("tokenizer", type(tok).__name__, int(tok.model_max_length), tuple(_entry(out, dst / f.name) for f in files))


MACOS_FOR_IOS = {"iOS17": "macOS 14", "iOS18": "macOS 15"}  # coremltools' deployment targets: the same ML Program spec version


def _requirements(config: BundleConfig, versions: Mapping[str, str]) -> tuple[RuntimeRequirement, ...]:
    """What a device needs per target: the runtime at least as new as the one the bundle was built and checked with."""
    out = []
    if "onnx" in config.targets:
        v = versions.get("onnxruntime", "unknown")
        out.append(RuntimeRequirement("onnx", "onnxruntime", f">= {v}", v, ("CPUExecutionProvider",),
                                      "the .ort files (ORT Mobile) need an onnxruntime build with the operators in their "
                                      "<name>.required_operators.config (a reduced-operator build from those files, or the full "
                                      "package); the W8A16 unet_step runs as QDQ around float kernels"))
    if "executorch" in config.targets:
        v = versions.get("executorch", "unknown")
        out.append(RuntimeRequirement("executorch", "executorch", f">= {v}", v, ("XnnpackBackend",),
                                      "link the XNNPACK backend and the portable kernels of the ops outside its delegates "
                                      "(each .pte's metadata JSON lists them: ops_outside_delegates)"))
    if "coreml" in config.targets:
        out.append(RuntimeRequirement("coreml", "coreml", f"{config.coreml_target} / {MACOS_FOR_IOS.get(config.coreml_target, '?')}",
                                      f"coremltools {versions.get('coremltools', 'unknown')}", ("mlprogram",),
                                      "ML Program (.mlpackage); INT8 weights decompress through constexpr ops, fp16 compute"))
    return tuple(out)


def _with_safety(config: BundleConfig, root: Path) -> BundleConfig:
    """``config`` with the safety checker among its components when the family has one (and ``config.safety_checker``).

    Raises:
        BundleError: the safety checker was asked for by name but the family has none.
    """
    from relaydiff.export.components import SAFETY_FOLDERS, has_safety_checker

    has = has_safety_checker(root)
    if SAFETY_COMPONENT in config.components and not has:
        raise BundleError(f"component {SAFETY_COMPONENT!r}: the family has no safety checker (expected "
                          f"{' and '.join(f + '/' for f in SAFETY_FOLDERS)} in '{Path(root).name}')")
    if has and config.safety_checker and SAFETY_COMPONENT not in config.components:
        return replace(config, components=(*config.components, SAFETY_COMPONENT))
    if not config.safety_checker:
        return replace(config, components=tuple(c for c in config.components if c != SAFETY_COMPONENT))
    return config


def _write_safety(device: Any, root: Path, out: Path) -> SafetyCheckerSection:
    """Copy the feature extractor's preprocessing config into ``out/feature_extractor/`` and describe the checker."""
    from relaydiff.export.components import PREPROCESSOR_CONFIG, load_safety_checker

    folder = out / "feature_extractor"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(root) / "feature_extractor" / PREPROCESSOR_CONFIG, folder / PREPROCESSOR_CONFIG)
    checker = load_safety_checker(root)
    return SafetyCheckerSection(_entry(out, folder / PREPROCESSOR_CONFIG), int(checker.concept_embeds.shape[0]),
                                int(checker.special_care_embeds.shape[0]), type(checker).__name__)


def _write_optimum(device: Any, root: Path, scheduler: Any, out: Path, student: Any) -> OptimumLayoutSection:
    """Write ``out/optimum/`` (relaydiff.export.optimum_layout) and describe its files.

    Raises:
        BundleError: the device variant is a distilled student (optimum's pipeline runs CFG over a teacher-style UNet).
    """
    from relaydiff.export.optimum_layout import FOLDER, write_layout

    if student is not None:
        raise BundleError("--layout optimum: the device variant is a distilled student (one conditional pass, its own jumps); "
                          "optimum's ORTStableDiffusionPipeline runs a CFG UNet on a DDIM grid: build from a teacher variant")
    config = {k: _plain(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return OptimumLayoutSection(FOLDER, tuple(_entry(out, f) for f in write_layout(device, Path(root), config, out)))


def _write_denylist(path: Path, out: Path) -> DenylistSection:
    """Copy the denylist file into the bundle (``runtime.safety.DENYLIST_FILE``) and describe it."""
    from relaydiff.runtime.safety import DENYLIST_FILE, read_denylist

    entries = read_denylist(path)
    dst = out / DENYLIST_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dst)
    return DenylistSection(_entry(out, dst), len(entries))


def _component(comp: str, device: Any, branch: int) -> Any:
    """The component ``comp`` in the form ``device`` needs; the cached-step pair split at ``branch``."""
    from relaydiff.export.components import component_for

    component = component_for(comp, device)
    # the cached-step components (a Component subclass) have a cache_branch field; the base class has not
    return replace(cast(Any, component), cache_branch=branch) if comp in CACHE_COMPONENTS else component


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
    if comp in CACHE_COMPONENTS and precision != "fp32":
        return "the cached-step graphs are exported at fp32 only (INT8 calibration covers unet_step)"
    if comp == SAFETY_COMPONENT and target != "onnx":  # ONNX is required; another target's converter may refuse the CLIP tower
        from relaydiff.export.base import ExportError

        try:
            return _make_target(target, precision, comp, device, sub, config, calibration, fp32_onnx, branch)
        except ExportError as exc:
            return f"the safety checker did not convert for {target}: {str(exc)[:300]}"
    return _make_target(target, precision, comp, device, sub, config, calibration, fp32_onnx, branch)


def _make_target(
    target: str, precision: str, comp: str, device: Any, sub: Path, config: BundleConfig, calibration: Any, fp32_onnx: dict[str, Any],
    branch: int = 0,
) -> tuple[Any, str]:
    from relaydiff.export import get_exporter

    component = _component(comp, device, branch)
    if target == "onnx":
        if comp not in fp32_onnx:  # the fp32 model INT8 starts from; kept out of the bundle unless fp32 was asked for
            keep = "fp32" in config.precisions or comp == SAFETY_COMPONENT  # the checker ships at fp32 whatever was asked
            where = sub.parent / "fp32" if keep else Path(fp32_onnx["_scratch"]) / comp
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

        compressed = compress_coreml(art, sub)
        shutil.rmtree(art.path)
        art.metadata_path.unlink(missing_ok=True)
        return compressed, f"coremltools linear_quantize_weights int8 per-channel ({config.coreml_target}, fp16 compute)"
    if precision == "int8":
        from relaydiff.quantize.executorch_int8 import DEFAULT_FLOAT_MODULES, ExecuTorchInt8Config, export_int8

        qconfig = ExecuTorchInt8Config(float_modules=DEFAULT_FLOAT_MODULES if config.executorch_float is None else config.executorch_float)
        art = export_int8(component, device, calibration.for_component(comp), sub, qconfig, calibration_summary=calibration.summary())
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
    if SAFETY_COMPONENT in config.components:  # the drawn picture through the feature extractor's preprocessing
        picks[SAFETY_COMPONENT] = _component(SAFETY_COMPONENT, device, branch).example_inputs(device)
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
