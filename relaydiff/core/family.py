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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaydiff.core.errors import CompatibilityError, FamilyNotFoundError, RelaydiffError
from relaydiff.core.schedulers import NOISE_SCHEDULE_KEYS

if TYPE_CHECKING:
    from relaydiff.core.student import StudentSpec

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


def family_id(ref: ModelRef) -> str:
    """A short id of the shared latent space: family name plus a hash of VAE, tokenizer and noise schedule."""
    info = family_info(ref.root) or {}
    name = str(info.get("name", ref.root.name))
    vae = _config_hash(read_json(ref.root / "vae" / "config.json"))
    sched = read_json(ref.root / "scheduler" / "scheduler_config.json")
    sched_hash = _config_hash({k: sched.get(k) for k in NOISE_SCHEDULE_KEYS})
    digest = hashlib.sha256(f"{vae}{tokenizer_hash(ref.root)}{sched_hash}".encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def relay_fields(ref: ModelRef) -> dict[str, Any]:
    """The config values that decide whether two models can relay, read from configs only (no weights)."""
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
        "text_encoder.hidden_size": text.get("hidden_size"),
        "tokenizer.hash": tokenizer_hash(ref.root),
        "tokenizer.model_max_length": tok_cfg.get("model_max_length"),
    }
    for key in NOISE_SCHEDULE_KEYS:
        fields[f"scheduler.{key}"] = sched.get(key)
    fields["scheduler.prediction_type"] = sched.get("prediction_type", "epsilon")
    return fields


def check_pair(host: ModelRef, device: ModelRef) -> None:
    """Check that ``host`` can hand a latent to ``device``.

    Raises:
        CompatibilityError: naming the first field that differs and both values.
    """
    hf, df = relay_fields(host), relay_fields(device)
    for key in hf:
        if hf[key] != df[key]:
            raise CompatibilityError(key, hf[key], df[key])
    for ref, fields in ((host, hf), (device, df)):
        unet = read_json(ref.root / ref.unet_subfolder / "config.json")
        if unet.get("in_channels", 4) != fields["vae.latent_channels"]:
            raise CompatibilityError(
                f"{ref.variant} unet.in_channels vs vae.latent_channels",
                unet.get("in_channels", 4),
                fields["vae.latent_channels"],
            )
        cad = unet.get("cross_attention_dim")
        if cad != hf["text_encoder.hidden_size"]:
            raise CompatibilityError(
                f"{ref.variant} unet.cross_attention_dim vs host text_encoder.hidden_size",
                cad,
                hf["text_encoder.hidden_size"],
            )


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
