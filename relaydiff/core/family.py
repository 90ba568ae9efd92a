"""Model families: find host and device models in local diffusers folders, check they can relay, load them.

A model folder is a StableDiffusionPipeline folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``model_index.json``). A *family* folder is the same with extra
UNet folders and a ``family.json`` naming them as variants, e.g.
``{"variants": {"host": "unet", "device": "unet_device"}, "default_host": "host", "default_device": "device"}``.
Nothing is ever fetched from a hub: every path is local and a missing one is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaydiff.core.errors import CompatibilityError, FamilyNotFoundError, RelaydiffError, RelayStateError
from relaydiff.core.schedulers import NOISE_SCHEDULE_KEYS

if TYPE_CHECKING:
    from relaydiff.core.relay import RelaySide
    from relaydiff.core.state import RelayState
    from relaydiff.core.student import StudentSpec

logger = logging.getLogger(__name__)

FAMILY_FILE = "family.json"
FAMILY_FORMAT = "relaydiff-family/1"
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ModelRef:
    """Where one model of a relay lives: a pipeline folder and the UNet subfolder to use."""

    root: Path  # the pipeline (or family) folder
    unet_subfolder: str  # e.g. "unet" or "unet_device"
    variant: str  # the family variant name, or "unet" for a plain pipeline folder

    @property
    def label(self) -> str:
        return f"{self.root}:{self.variant}"


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; missing or malformed files are clear errors."""
    if not path.is_file():
        raise FamilyNotFoundError(f"missing file: '{path}'")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RelaydiffError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RelaydiffError(f"'{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def family_info(root: Path) -> dict[str, Any] | None:
    """The family.json of ``root``, or None for a plain pipeline folder."""
    path = root / FAMILY_FILE
    return read_json(path) if path.is_file() else None


def resolve(path: str | Path, variant: str | None = None, *, role: str = "host") -> ModelRef:
    """Resolve a folder (plus an optional family variant) to a :class:`ModelRef`.

    Args:
        path: a pipeline folder or a family folder.
        variant: a family variant (e.g. "host", "device"); defaults to the family's default for ``role``.
        role: "host" or "device", which default variant to pick.

    Raises:
        FamilyNotFoundError: the folder or its model_index.json/UNet folder is missing.
        RelaydiffError: unknown variant.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FamilyNotFoundError(f"model folder not found: '{root}' (only local folders are supported)")
    if not (root / "model_index.json").is_file():
        raise FamilyNotFoundError(f"'{root}' is not a diffusers pipeline folder: model_index.json is missing")
    info = family_info(root)
    if info is None:
        if variant not in (None, "unet"):
            raise RelaydiffError(f"'{root}' has no {FAMILY_FILE}, so it has no variant {variant!r}; only 'unet'")
        sub, name = "unet", "unet"
    else:
        variants = info.get("variants")
        if not isinstance(variants, dict) or not variants:
            raise RelaydiffError(f"'{root / FAMILY_FILE}' must map 'variants' to UNet subfolders")
        name = variant or info.get(f"default_{role}") or ("host" if role == "host" else "device")
        if name not in variants:
            raise RelaydiffError(f"unknown variant {name!r} in '{root}'; expected one of: {', '.join(sorted(variants))}")
        sub = str(variants[name])
    if not (root / sub / "config.json").is_file():
        raise FamilyNotFoundError(f"UNet folder missing: '{root / sub}' (no config.json)")
    return ModelRef(root=root, unet_subfolder=sub, variant=name)


def _config_hash(config: dict[str, Any]) -> str:
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_hash(root: Path) -> str:
    """A hash over the tokenizer's vocabulary files (same hash = same token ids)."""
    tok = root / "tokenizer"
    if not tok.is_dir():
        raise FamilyNotFoundError(f"tokenizer folder missing: '{tok}'")
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = tok / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_weights_cache: dict[tuple[str, int, int], str] = {}


def _weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` loads from ``folder`` (no variant): safetensors before .bin."""
    if not folder.is_dir():
        raise FamilyNotFoundError(f"model folder missing: '{folder}'")
    for suffix in _WEIGHT_SUFFIXES:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == suffix and p.name.count(".") == 1)
        if files:
            return files
    raise FamilyNotFoundError(f"no weights in '{folder}': expected a *.safetensors (or *.bin) file")


def _file_hash(path: Path) -> str:
    """A hash of a weight file's tensors (name, dtype, shape, bytes; safetensors metadata ignored), or of a
    .bin file's bytes (never unpickled). Cached per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _weights_cache:
        return _weights_cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            # the header is parsed here (8-byte length + JSON) rather than by loading tensors: no torch, no copy
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                if not 0 < n <= min(st.st_size - 8, 100_000_000):
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                entries = sorted((name, e["dtype"], list(e["shape"]), *e["data_offsets"]) for name, e in header.items())
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise RelaydiffError(f"'{path}' is not a valid safetensors file: {exc}") from None
            base = 8 + n
            for name, dtype, shape, a, b in entries:
                h.update(json.dumps([name, dtype, shape]).encode())
                f.seek(base + int(a))
                h.update(f.read(int(b) - int(a)))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    _weights_cache[key] = digest = h.hexdigest()[:16]
    return digest


def weights_hash(folder: Path) -> str:
    """A content hash of the weights in a model subfolder (e.g. ``vae/``, ``text_encoder/``)."""
    files = _weight_files(folder)
    if len(files) == 1:
        return _file_hash(files[0])
    return hashlib.sha256("".join(_file_hash(p) for p in files).encode()).hexdigest()[:16]


def latent_spec(root: Path) -> dict[str, Any]:
    """What the latent space is: channels, scaling and shift of the VAE, and the noise schedule it is noised on."""
    vae = read_json(root / "vae" / "config.json")
    sched = read_json(root / "scheduler" / "scheduler_config.json")
    spec: dict[str, Any] = {
        "latent_channels": vae.get("latent_channels", 4),
        "scaling_factor": vae.get("scaling_factor", 0.18215),
        "shift_factor": vae.get("shift_factor"),
    }
    for key in NOISE_SCHEDULE_KEYS:
        spec[key] = sched.get(key, "epsilon" if key == "prediction_type" else None)
    return spec


def family_id(ref: ModelRef) -> str:
    """The family id: a content hash of what host and device must share (VAE weights, text encoder weights and
    tokenizer, noise schedule, latent spec). The folder name plays no part; it is only a label."""
    root = ref.root
    content = {
        "vae": weights_hash(root / "vae"),
        "text_encoder": weights_hash(root / "text_encoder"),
        "tokenizer": tokenizer_hash(root),
        "latent": latent_spec(root),
    }
    fid = "fam-" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    logger.debug("family id of '%s': %s (vae %s, text encoder %s, tokenizer %s)", root, fid, content["vae"],
                 content["text_encoder"], content["tokenizer"])
    return fid


def family_label(ref: ModelRef) -> str:
    """A human label for the family of ``ref``: family.json's name, else the folder name."""
    info = family_info(ref.root) or {}
    return str(info.get("name", ref.root.name))


def relay_fields(ref: ModelRef) -> dict[str, Any]:
    """The values that decide whether two models can relay: configs, plus content hashes of the shared weights."""
    unet = read_json(ref.root / ref.unet_subfolder / "config.json")
    vae = read_json(ref.root / "vae" / "config.json")
    text = read_json(ref.root / "text_encoder" / "config.json")
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    tok_cfg_path = ref.root / "tokenizer" / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    fields: dict[str, Any] = {
        "unet.in_channels": unet.get("in_channels", 4),
        "unet.out_channels": unet.get("out_channels", 4),
        "vae.latent_channels": vae.get("latent_channels", 4),
        "vae.scaling_factor": vae.get("scaling_factor", 0.18215),
        "vae.shift_factor": vae.get("shift_factor"),
        "vae.config_hash": _config_hash(vae),
        "vae.weights_hash": weights_hash(ref.root / "vae"),
        "text_encoder.hidden_size": text.get("hidden_size"),
        "text_encoder.weights_hash": weights_hash(ref.root / "text_encoder"),
        "tokenizer.hash": tokenizer_hash(ref.root),
        "tokenizer.model_max_length": tok_cfg.get("model_max_length"),
    }
    for key in NOISE_SCHEDULE_KEYS:
        fields[f"scheduler.{key}"] = sched.get(key)
    fields["scheduler.prediction_type"] = sched.get("prediction_type", "epsilon")
    return fields


def mismatches(host: ModelRef, device: ModelRef) -> list[tuple[str, Any, Any]]:
    """Every reason ``host`` cannot hand a latent to ``device``, as ``(field, host value, device value)``."""
    hf, df = relay_fields(host), relay_fields(device)
    found = [(key, hf[key], df[key]) for key in hf if hf[key] != df[key]]
    for ref, fields in ((host, hf), (device, df)):
        unet = read_json(ref.root / ref.unet_subfolder / "config.json")
        if unet.get("in_channels", 4) != fields["vae.latent_channels"]:
            found.append((f"{ref.variant} unet.in_channels vs vae.latent_channels",
                          unet.get("in_channels", 4), fields["vae.latent_channels"]))
        cad = unet.get("cross_attention_dim")
        if cad != hf["text_encoder.hidden_size"]:
            found.append((f"{ref.variant} unet.cross_attention_dim vs host text_encoder.hidden_size",
                          cad, hf["text_encoder.hidden_size"]))
    return found


def check_pair(host: ModelRef, device: ModelRef) -> None:
    """Check that ``host`` can hand a latent to ``device``.

    Raises:
        CompatibilityError: listing every field that differs, with both values.
    """
    found = mismatches(host, device)
    if found:
        raise CompatibilityError.of(found)


def _target_facts(target: Any) -> tuple[str, Any, int, int]:
    """(family id, scheduler config, latent channels, text-embedding width) of a LoadedModel or a RelaySide."""
    if isinstance(target, LoadedModel):
        unet = target.unet.config
        return target.family_id, target.scheduler_config, int(unet.in_channels), int(unet.cross_attention_dim)
    denoiser = target.denoiser  # a relaydiff.core.relay.RelaySide (not imported: relay imports this module)
    return target.family_id, target.scheduler_config, int(denoiser.latent_spec.channels), int(denoiser.text_embed_dim)


def state_mismatches(target: LoadedModel | RelaySide, state: RelayState) -> list[tuple[str, Any, Any]]:
    """Every reason ``target`` cannot continue ``state``, as ``(field, state's value, target's value)``: family id,
    each noise-schedule key, latent channels and text-embedding width."""
    fid, sched, channels, width = _target_facts(target)
    found: list[tuple[str, Any, Any]] = []
    if state.family_id != fid:
        found.append(("family_id", state.family_id, fid))
    for key in NOISE_SCHEDULE_KEYS:
        default = "epsilon" if key == "prediction_type" else None
        theirs, mine = state.scheduler_config.get(key, default), sched.get(key, default)
        mine = list(mine) if isinstance(mine, tuple) else mine
        theirs = list(theirs) if isinstance(theirs, tuple) else theirs
        if theirs != mine:
            found.append((f"scheduler.{key}", theirs, mine))
    if int(state.latents.shape[1]) != channels:
        found.append(("latent.channels", int(state.latents.shape[1]), channels))
    if int(state.prompt_embeds.shape[-1]) != width:
        found.append(("text_embeds.width", int(state.prompt_embeds.shape[-1]), width))
    return found


def check_state(target: LoadedModel | RelaySide, state: RelayState) -> None:
    """Check that ``target`` (a loaded model, or the RelaySide of a runtime backend) can continue relay ``state``.

    THE compatibility check of a state: ``relay.resume`` runs it, and with it every path that consumes a state
    (``relaydiff resume``, ``DeviceRuntime.finish``, the host's fallback). It checks a *validated* state
    (``RelayState.from_bytes`` or ``relaydiff.core.state.validate``); it does not validate again.

    Raises:
        CompatibilityError: the state is from another family or noise schedule, listing every mismatch
            (``latent.channels`` and ``text_embeds.width`` too) as (field, state's value, device's value).
        RelayStateError: same family and schedule, but the latent or embeddings do not fit the device UNet
            (a malformed state; every such problem).
    """
    found = state_mismatches(target, state)
    shapes = {"latent.channels": "relay latent has {} channels; the device UNet expects {}",
              "text_embeds.width": "relay text embeddings have width {}; the device UNet expects {}"}
    if any(f not in shapes for f, _, _ in found):
        raise CompatibilityError.of(found, subject="the relay state and this device")
    if found:
        raise RelayStateError("; ".join(shapes[f].format(a, b) for f, a, b in found))


# diffusers scheduler class (and config) -> our sampler name (relaydiff.core.schedulers.SAMPLERS)
_FOLDER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "PNDMScheduler": "pndm",
    "UniPCMultistepScheduler": "unipc",
}


def folder_sampler(ref: ModelRef) -> str | None:
    """The sampler name of the model folder's own scheduler, or None when the relay cannot carry it."""
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    name = str(sched.get("_class_name", ""))
    if name == "DPMSolverMultistepScheduler":
        algo = sched.get("algorithm_type", "dpmsolver++")
        return {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}.get(algo)
    return _FOLDER_SAMPLERS.get(name)


def default_sampler(ref: ModelRef) -> str:
    """The sampler a request uses when none is named: the folder's own scheduler where supported, else DDIM."""
    from relaydiff.core.schedulers import SAMPLERS

    name = folder_sampler(ref)
    if name is not None and name in SAMPLERS:
        return name
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    logger.info("the scheduler of '%s' (%s) cannot be relayed; sampling with ddim", ref.root, sched.get("_class_name"))
    return "ddim"


def require_family(path: str | Path, *, needed: str = "a host and a device") -> Path:
    """``path``, refused when it is a plain pipeline folder (model_index.json but no family.json): it holds one
    UNet where ``needed`` is a pair. A missing folder is left to the caller's own check (and message).

    Raises:
        RelaydiffError: a plain pipeline folder, naming what is missing.
    """
    root = Path(path).expanduser()
    if (root / "model_index.json").is_file() and family_info(root) is None:
        raise RelaydiffError(
            f"'{root}' is a plain diffusers pipeline folder (no {FAMILY_FILE}): it has one UNet, and this needs "
            f"{needed}; build a family with `relaydiff family init --host DIR --device DIR --out DIR`, "
            "or pass --host DIR --device DIR where the command takes them")
    return root


_PIPELINE_PARTS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                   "tokenizer", "scheduler/scheduler_config.json")


def _require_pipeline(path: Path, role: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FamilyNotFoundError(f"--{role} folder not found: '{root}'")
    missing = [part for part in _PIPELINE_PARTS if not (root / part).exists()]
    if missing:
        raise FamilyNotFoundError(f"--{role} '{root}' is not a diffusers pipeline folder: missing {', '.join(missing)}")
    return root


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link a file where the filesystem allows (model weights are large), else copy it."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def init_family(host: Path, device: Path, out: Path, *, variants: dict[str, Path] | None = None,
                name: str | None = None) -> Path:
    """Build a family folder from two plain diffusers pipeline folders (plus extra device variants).

    The host folder gives the shared parts (VAE, text encoder, tokenizer, scheduler) and the ``host`` UNet; the
    device folder the ``device`` UNet (``unet_device/``); each extra variant NAME=DIR its UNet (``unet_NAME/``).
    Every device folder must pass the relay check against the host. The folder is assembled in a temporary
    folder beside ``out`` and renamed into place, so a refusal leaves nothing behind.

    Raises:
        FamilyNotFoundError: a folder is missing, or is not a pipeline folder (naming what it lacks).
        CompatibilityError: a device folder cannot relay with the host (listing every mismatch).
        RelaydiffError: ``out`` exists and is not empty, or a bad variant name.
    """
    import shutil
    import tempfile

    host_dir = _require_pipeline(host, "host")
    devices = {"device": _require_pipeline(device, "device")}
    for vname, vdir in (variants or {}).items():
        if not vname.replace("_", "").isalnum() or vname in ("host", "device"):
            raise RelaydiffError(f"variant name {vname!r} must be letters, digits and underscores, and not host or device")
        devices[vname] = _require_pipeline(vdir, f"variant {vname}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RelaydiffError(f"--out '{out}' exists and is not an empty folder")
    host_ref = ModelRef(host_dir, "unet", "host")
    for vname, vdir in devices.items():
        found = mismatches(host_ref, ModelRef(vdir, "unet", vname))
        if found:
            raise CompatibilityError.of(found, subject=f"host '{host_dir}' and {vname} '{vdir}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(host_dir, tmp / "f", copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(FAMILY_FILE, "unet_*"))
        table = {"host": "unet"}
        for vname, vdir in devices.items():
            sub = "unet_device" if vname == "device" else f"unet_{vname}"
            shutil.copytree(vdir / "unet", tmp / "f" / sub, copy_function=_link_or_copy)
            table[vname] = sub
        info = {"format": FAMILY_FORMAT, "name": name or out.name, "variants": table,
                "default_host": "host", "default_device": "device",
                "sources": {"host": host_dir.name, **{k: v.name for k, v in devices.items()}}}
        (tmp / "f" / FAMILY_FILE).write_text(json.dumps(info, indent=1) + "\n")
        check_pair(resolve(tmp / "f", role="host"), resolve(tmp / "f", role="device"))
        if out.exists():
            out.rmdir()
        (tmp / "f").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class LoadedModel:
    """The torch modules of one side of a relay."""

    ref: ModelRef
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (or compatible)
    tokenizer: Any  # transformers CLIPTokenizer (or compatible)
    scheduler_config: dict[str, Any]
    family_id: str
    student: StudentSpec | None = None  # a distilled student's relaydiff_student.json (relaydiff.core.student)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load(ref: ModelRef, *, share_with: LoadedModel | None = None) -> LoadedModel:
    """Load a model's UNet, VAE, text encoder and tokenizer from its local folder (eval mode, fp32).

    ``share_with``: reuse that model's VAE/text encoder/tokenizer when it lives in the same folder.
    """
    import diffusers
    import transformers

    root = str(ref.root)
    index = read_json(ref.root / "model_index.json")
    unet = diffusers.UNet2DConditionModel.from_pretrained(root, subfolder=ref.unet_subfolder, local_files_only=True)
    if share_with is not None and share_with.ref.root == ref.root:
        vae, text_encoder, tokenizer = share_with.vae, share_with.text_encoder, share_with.tokenizer
    else:
        vae = diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        te_cls = _library_class(index, "text_encoder", transformers, "CLIPTextModel")
        tok_cls = _library_class(index, "tokenizer", transformers, "CLIPTokenizer")
        text_encoder = te_cls.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
        tokenizer = tok_cls.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    from relaydiff.core.student import read_student

    student = read_student(ref.root / ref.unet_subfolder)
    return LoadedModel(ref, unet, vae, text_encoder, tokenizer, sched, family_id(ref), student)


def _library_class(index: dict[str, Any], key: str, module: Any, default: str) -> Any:
    """The class model_index.json names for ``key``, restricted to the transformers library."""
    entry = index.get(key)
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else default
    cls = getattr(module, str(name), None)
    if cls is None:
        raise RelaydiffError(f"model_index.json names {key} class {name!r}, which transformers does not have")
    return cls


EMBEDDED_FAMILY = Path(__file__).resolve().parent.parent / "assets" / "tinyshapes"


def default_family_dir(*, quiet: bool = True) -> Path:
    """The default family: the embedded trained family when present, else the ``tiny`` preset (built once, cached).

    The cache folder is ``$RELAYDIFF_CACHE`` or ``~/.cache/relaydiff``.
    """
    import os

    if (EMBEDDED_FAMILY / "model_index.json").is_file() and (EMBEDDED_FAMILY / FAMILY_FILE).is_file():
        return EMBEDDED_FAMILY
    cache = Path(os.environ.get("RELAYDIFF_CACHE", Path.home() / ".cache" / "relaydiff")) / "presets" / "tiny"
    if not (cache / FAMILY_FILE).is_file():
        from relaydiff.presets import build_preset

        build_preset("tiny", cache, overwrite=True)
    return cache
