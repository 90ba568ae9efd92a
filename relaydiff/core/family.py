"""Model families: find host and device models in local diffusers folders, check they can relay, load them.

A model folder is a StableDiffusionPipeline folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``model_index.json``), a StableDiffusionXLPipeline folder (plus
``text_encoder_2/``, ``tokenizer_2/``) or a StableDiffusion3Pipeline folder (``transformer/`` for the
UNet, three text encoders and tokenizers, a flow-match scheduler); :func:`pipeline_style` tells them apart. A *family* folder is the same with extra
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
from relaydiff.core.schedulers import NOISE_SCHEDULE_KEYS, is_flow_config, noise_schedule

if TYPE_CHECKING:
    from relaydiff.core.relay import RelaySide
    from relaydiff.core.state import RelayState
    from relaydiff.core.student import StudentSpec

logger = logging.getLogger(__name__)

FAMILY_FILE = "family.json"
FAMILY_FORMAT = "relaydiff-family/1"
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "spiece.model")
STYLES = {"StableDiffusion3Pipeline": "sd3", "StableDiffusionXLPipeline": "sdxl"}  # pipeline class -> style; else "sd"
TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # with tokenizer, tokenizer_2, tokenizer_3


def pipeline_style(root: Path) -> str:
    """The family style of a pipeline folder: "sd3" (MMDiT transformer, rectified flow, three text encoders),
    "sdxl" (text-time UNet, two text encoders) or "sd" (SD 1.x/2.x), from model_index.json's class name."""
    return STYLES.get(str(read_json(root / "model_index.json").get("_class_name", "")), "sd")


def _network_folder(root: Path) -> str:
    """The denoising network's subfolder of a plain pipeline folder: ``transformer`` for SD3, else ``unet``."""
    return "transformer" if not (root / "unet").is_dir() and (root / "transformer").is_dir() else "unet"


def _text_subfolders(root: Path) -> list[str]:
    return [sub for sub in TEXT_SUBFOLDERS if (root / sub / "config.json").is_file()]


@dataclass(frozen=True)
class ModelRef:
    """Where one model of a relay lives: a pipeline folder and the UNet subfolder to use."""

    root: Path  # the pipeline (or family) folder
    unet_subfolder: str  # the denoising network's folder, e.g. "unet", "unet_device" or (SD3) "transformer"
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
        net = _network_folder(root)
        if variant not in (None, net):
            raise RelaydiffError(f"'{root}' has no {FAMILY_FILE}, so it has no variant {variant!r}; only {net!r}")
        sub, name = net, net
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


def tokenizer_hash(root: Path, subfolder: str = "tokenizer") -> str:
    """A hash over the tokenizer's vocabulary files (same hash = same token ids)."""
    tok = root / subfolder
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
    if is_flow_config(sched):  # a flow family: its kind, shift and dynamic-shift settings (SD folders keep their id)
        spec.update(noise_schedule(sched))
        return spec
    for key in NOISE_SCHEDULE_KEYS:
        spec[key] = sched.get(key, "epsilon" if key == "prediction_type" else None)
    return spec


def family_id(ref: ModelRef) -> str:
    """The family id: a content hash of what host and device must share (VAE weights, text encoder weights and
    tokenizer, noise schedule, latent spec). The folder name plays no part; it is only a label."""
    root = ref.root
    content: dict[str, Any] = {
        "vae": weights_hash(root / "vae"),
        "text_encoder": weights_hash(root / "text_encoder"),
        "tokenizer": tokenizer_hash(root),
        "latent": latent_spec(root),
    }
    for sub in _text_subfolders(root)[1:]:  # SDXL's and SD3's further encoders (an SD family's id is unchanged)
        suffix = sub[len("text_encoder"):]
        content[sub] = weights_hash(root / sub)
        content[f"tokenizer{suffix}"] = tokenizer_hash(root, f"tokenizer{suffix}")
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
    if is_flow_config(sched):
        for key, value in noise_schedule(sched).items():
            fields[f"scheduler.{key}"] = value
    else:
        for key in NOISE_SCHEDULE_KEYS:
            fields[f"scheduler.{key}"] = sched.get(key)
        fields["scheduler.kind"] = "diffusion"
        fields["scheduler.prediction_type"] = sched.get("prediction_type", "epsilon")
    fields.update(_conditioning_fields(ref, unet))
    return fields


def _text_width(cfg: dict[str, Any]) -> Any:
    return cfg.get("hidden_size", cfg.get("d_model"))  # CLIP's hidden_size, T5's d_model


def _conditioning_fields(ref: ModelRef, net: dict[str, Any]) -> dict[str, Any]:
    """The conditioning layout of a model: its style, each text encoder (class, width, projection) and tokenizer,
    the pooled width and the time-id layout its network takes. SD folders keep exactly their old fields plus the style."""
    style = pipeline_style(ref.root)
    subs = _text_subfolders(ref.root)
    fields: dict[str, Any] = {"style": style, "text_encoders.count": len(subs)}
    if style == "sd":
        return fields
    texts = {sub: read_json(ref.root / sub / "config.json") for sub in subs}
    for sub, cfg in texts.items():
        suffix = sub[len("text_encoder"):]
        arch = cfg.get("architectures") or [None]
        fields[f"{sub}.class"] = arch[0]
        fields[f"{sub}.hidden_size"] = _text_width(cfg)
        fields[f"{sub}.projection_dim"] = cfg.get("projection_dim") if "Projection" in str(arch[0]) else None
        if sub != "text_encoder":  # the first encoder's weights and tokenizer are in the fields already
            fields[f"{sub}.weights_hash"] = weights_hash(ref.root / sub)
            tok = ref.root / f"tokenizer{suffix}"
            tok_cfg = read_json(tok / "tokenizer_config.json") if (tok / "tokenizer_config.json").is_file() else {}
            fields[f"tokenizer{suffix}.hash"] = tokenizer_hash(ref.root, f"tokenizer{suffix}")
            fields[f"tokenizer{suffix}.model_max_length"] = tok_cfg.get("model_max_length")
    if style == "sdxl":
        pooled = (texts.get("text_encoder_2") or {}).get("projection_dim")
        fields["pooled.width"] = pooled
        time_dim = net.get("addition_time_embed_dim")
        proj_in = net.get("projection_class_embeddings_input_dim")
        n = (proj_in - pooled) // time_dim if isinstance(proj_in, int) and isinstance(pooled, int) and time_dim else None
        fields["time_ids.count"] = n
        fields["time_ids.layout"] = "original_size,crop_top_left,target_size" if n == 6 else None
        fields["unet.addition_embed_type"] = net.get("addition_embed_type")
    else:  # sd3: the pooled CLIP-L + CLIP-G projections, and no time ids
        widths = [(texts.get(sub) or {}).get("projection_dim") for sub in ("text_encoder", "text_encoder_2")]
        fields["pooled.width"] = sum(widths) if all(isinstance(w, int) for w in widths) else None
        fields["time_ids.count"] = None
        fields["time_ids.layout"] = None
    return fields


def _network_text_width(net: dict[str, Any]) -> Any:
    """D of the (B, L, D) text embeddings a network takes: a UNet's cross_attention_dim, an SD3 transformer's
    joint_attention_dim."""
    return net.get("cross_attention_dim", net.get("joint_attention_dim"))


def _expected_text_width(ref: ModelRef) -> Any:
    """D of the text embeddings the folder's encoders make: SD's one encoder; SDXL's two concatenated (CLIP-L +
    CLIP-G penultimate layers); SD3's T5 width (the CLIP pair is zero-padded to it)."""
    style = pipeline_style(ref.root)
    cfgs = [read_json(ref.root / sub / "config.json") for sub in _text_subfolders(ref.root)]
    if style == "sdxl" and len(cfgs) >= 2:
        widths = [_text_width(c) for c in cfgs[:2]]
        return sum(widths) if all(isinstance(w, int) for w in widths) else None
    if style == "sd3" and len(cfgs) >= 3:
        return _text_width(cfgs[2])
    return _text_width(cfgs[0]) if cfgs else None


def _pooled_input(net: dict[str, Any], fields: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The network's pooled input width against what the encoders give, as (name, network, encoders), if it has one."""
    if fields.get("style") == "sd3":
        return ("transformer.pooled_projection_dim vs pooled.width", net.get("pooled_projection_dim"), fields["pooled.width"])
    if fields.get("style") == "sdxl":
        time_dim, n, pooled = net.get("addition_time_embed_dim"), fields.get("time_ids.count"), fields.get("pooled.width")
        want = pooled + n * time_dim if isinstance(time_dim, int) and isinstance(n, int) and isinstance(pooled, int) else None
        return ("unet.projection_class_embeddings_input_dim vs pooled.width + time ids",
                net.get("projection_class_embeddings_input_dim"), want)
    return None


def mismatches(host: ModelRef, device: ModelRef) -> list[tuple[str, Any, Any]]:
    """Every reason ``host`` cannot hand a latent to ``device``, as ``(field, host value, device value)``: the
    shared parts (VAE channels, scaling and shift factor, noise schedule with its kind, prediction and shift),
    the conditioning layout (style, number, classes and widths of the text encoders, pooled width, time ids),
    and each network against the encoders it is fed."""
    hf, df = relay_fields(host), relay_fields(device)
    found = [(key, hf.get(key), df.get(key)) for key in {**hf, **df} if hf.get(key) != df.get(key)]
    want_width = _expected_text_width(host)
    for ref, fields in ((host, hf), (device, df)):
        net = read_json(ref.root / ref.unet_subfolder / "config.json")
        if net.get("in_channels", 4) != fields["vae.latent_channels"]:
            found.append((f"{ref.variant} unet.in_channels vs vae.latent_channels",
                          net.get("in_channels", 4), fields["vae.latent_channels"]))
        width = _network_text_width(net)
        if width != want_width:
            what = "unet.cross_attention_dim" if "cross_attention_dim" in net else "transformer.joint_attention_dim"
            found.append((f"{ref.variant} {what} vs host text width", width, want_width))
        pooled = _pooled_input(net, hf)
        if pooled is not None and pooled[1] != pooled[2]:
            found.append((f"{ref.variant} {pooled[0]}", pooled[1], pooled[2]))
    return found


def check_pair(host: ModelRef, device: ModelRef) -> None:
    """Check that ``host`` can hand a latent to ``device``.

    Raises:
        CompatibilityError: listing every field that differs, with both values.
    """
    found = mismatches(host, device)
    if found:
        raise CompatibilityError.of(found)


def check_state(target: LoadedModel | RelaySide, state: RelayState) -> None:
    """Check that ``target`` (a loaded model, or the RelaySide of a runtime backend) can continue relay ``state``.

    THE compatibility check of a state: ``relay.resume`` runs it, and with it every path that consumes a state
    (``relaydiff resume``, ``DeviceRuntime.finish``, the host's fallback). It checks a *validated* state
    (``RelayState.from_bytes`` or ``relaydiff.core.state.validate``); it does not validate again. It compares the
    family id (a content hash of the shared weights and latent spec), the noise schedule (kind, prediction,
    shift), latent channels, text-embedding width and added conditioning (``relay.state_mismatches``).

    Raises:
        CompatibilityError: the state is from another family or noise schedule, listing every mismatch
            (the shape fields too) as (field, state's value, device's value).
        RelayStateError: same family and schedule, but the latent or conditioning does not fit the device
            network (a malformed state; every such problem).
    """
    from relaydiff.core.relay import SHAPE_FIELDS, state_mismatches

    found = state_mismatches(target, state)
    if any(f not in SHAPE_FIELDS for f, _, _ in found):
        raise CompatibilityError.of(found, subject="the relay state and this device")
    if found:
        shapes = {"latent.channels": "relay latent has {} channels; the device UNet expects {}",
                  "text_embeds.width": "relay text embeddings have width {}; the device UNet expects {}"}

        def say(f: str, a: Any, b: Any) -> str:
            name = f.removesuffix(".width")
            if f in shapes:
                return shapes[f].format(a, b)
            if a is None:
                return f"relay state lacks {name}; the device network needs them (width {b})"
            if b is None:
                return f"relay state carries {name} (width {a}); the device network takes none"
            return f"relay {name} have width {a}; the device network expects {b}"

        raise RelayStateError("; ".join(say(f, a, b) for f, a, b in found))


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
        if is_flow_config(sched):
            return "flow_dpmpp_2m" if algo == "dpmsolver++" else None
        return {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}.get(algo)
    if name == "FlowMatchEulerDiscreteScheduler":
        return "flow_euler_sde" if sched.get("stochastic_sampling") else "flow_euler"
    return _FOLDER_SAMPLERS.get(name)


def default_sampler(ref: ModelRef) -> str:
    """The sampler a request uses when none is named: the folder's own scheduler where supported, else DDIM."""
    from relaydiff.core.schedulers import SAMPLERS, fallback_sampler

    name = folder_sampler(ref)
    if name is not None and name in SAMPLERS:
        return name
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    fallback = fallback_sampler(sched)
    logger.info("the scheduler of '%s' (%s) cannot be relayed; sampling with %s", ref.root, sched.get("_class_name"), fallback)
    return fallback


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


_PIPELINE_PARTS = ("model_index.json", "vae/config.json", "text_encoder/config.json",
                   "tokenizer", "scheduler/scheduler_config.json")


def _require_pipeline(path: Path, role: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FamilyNotFoundError(f"--{role} folder not found: '{root}'")
    missing = [part for part in _PIPELINE_PARTS if not (root / part).exists()]
    if not (root / "unet" / "config.json").exists() and not (root / "transformer" / "config.json").exists():
        missing.insert(int(bool(missing) and missing[0] == "model_index.json"), "unet/config.json (or transformer/config.json)")
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
    unet: Any  # the denoising network: a diffusers UNet2DConditionModel, or for style "sd3" an SD3Transformer2DModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (or compatible; CLIPTextModelWithProjection for SD3)
    tokenizer: Any  # transformers CLIPTokenizer (or compatible)
    scheduler_config: dict[str, Any]
    family_id: str
    student: StudentSpec | None = None  # a distilled student's relaydiff_student.json (relaydiff.core.student)
    style: str = "sd"  # "sd", "sdxl" or "sd3" (see pipeline_style)
    text_encoder_2: Any = None  # SDXL/SD3: CLIPTextModelWithProjection (OpenCLIP bigG shape)
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3: T5EncoderModel
    tokenizer_3: Any = None
    pipeline_config: dict[str, Any] | None = None  # model_index.json (e.g. SDXL's force_zeros_for_empty_prompt)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load(ref: ModelRef, *, share_with: LoadedModel | None = None) -> LoadedModel:
    """Load a model's denoising network (UNet, or SD3 transformer), VAE, text encoders and tokenizers from its
    local folder (eval mode, fp32).

    ``share_with``: reuse that model's VAE/text encoders/tokenizers when it lives in the same folder.
    """
    import diffusers
    import transformers

    root = str(ref.root)
    index = read_json(ref.root / "model_index.json")
    style = pipeline_style(ref.root)
    net_cls = diffusers.SD3Transformer2DModel if style == "sd3" else diffusers.UNet2DConditionModel
    unet = net_cls.from_pretrained(root, subfolder=ref.unet_subfolder, local_files_only=True)
    texts: dict[str, Any] = {}
    if share_with is not None and share_with.ref.root == ref.root:
        vae = share_with.vae
        for sub in TEXT_SUBFOLDERS:
            suffix = sub[len("text_encoder"):]
            texts[sub], texts[f"tokenizer{suffix}"] = getattr(share_with, sub), getattr(share_with, f"tokenizer{suffix}")
    else:
        vae = diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        for i, sub in enumerate(_text_subfolders(ref.root)):
            suffix = sub[len("text_encoder"):]
            te_cls = _library_class(index, sub, transformers, "CLIPTextModel" if i == 0 else "CLIPTextModelWithProjection")
            tok_cls = _library_class(index, f"tokenizer{suffix}", transformers, "CLIPTokenizer")
            texts[sub] = te_cls.from_pretrained(root, subfolder=sub, local_files_only=True)
            texts[f"tokenizer{suffix}"] = tok_cls.from_pretrained(root, subfolder=f"tokenizer{suffix}", local_files_only=True)
    for module in (unet, vae, *(texts.get(sub) for sub in TEXT_SUBFOLDERS)):
        if module is not None:
            module.eval().requires_grad_(False)
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    from relaydiff.core.student import read_student

    student = read_student(ref.root / ref.unet_subfolder)
    return LoadedModel(ref, unet, vae, texts.get("text_encoder"), texts.get("tokenizer"), sched, family_id(ref), student,
                       style=style, text_encoder_2=texts.get("text_encoder_2"), tokenizer_2=texts.get("tokenizer_2"),
                       text_encoder_3=texts.get("text_encoder_3"), tokenizer_3=texts.get("tokenizer_3"),
                       pipeline_config=index)


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
