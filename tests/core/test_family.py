"""Family resolution and the relay compatibility check: each mismatch names the field and both values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from relaydiff.core import family
from relaydiff.core.errors import CompatibilityError, FamilyNotFoundError, RelaydiffError


@pytest.fixture()
def pair(tiny_family: Path, tmp_path: Path) -> tuple[Path, Path]:
    host = tmp_path / "host"
    device = tmp_path / "device"
    shutil.copytree(tiny_family, host)
    shutil.copytree(tiny_family, device)
    return host, device


def _edit(path: Path, **changes: Any) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _check(host: Path, device: Path) -> None:
    family.check_pair(family.resolve(host, role="host"), family.resolve(device, role="device"))


def test_identical_copies_relay(pair: tuple[Path, Path]) -> None:
    _check(*pair)


@pytest.mark.parametrize(
    ("rel", "changes", "field"),
    [
        ("unet_device/config.json", {"in_channels": 8}, "unet.in_channels"),
        ("unet_device/config.json", {"out_channels": 8}, "unet.out_channels"),
        ("vae/config.json", {"latent_channels": 8}, "vae.latent_channels"),
        ("vae/config.json", {"scaling_factor": 0.5}, "vae.scaling_factor"),
        ("vae/config.json", {"shift_factor": 0.1}, "vae.shift_factor"),
        ("vae/config.json", {"layers_per_block": 2}, "vae.config_hash"),
        ("text_encoder/config.json", {"hidden_size": 64}, "text_encoder.hidden_size"),
        ("tokenizer/tokenizer_config.json", {"model_max_length": 77}, "tokenizer.model_max_length"),
        ("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"}, "scheduler.prediction_type"),
        ("scheduler/scheduler_config.json", {"beta_schedule": "linear"}, "scheduler.beta_schedule"),
        ("scheduler/scheduler_config.json", {"beta_end": 0.02}, "scheduler.beta_end"),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": 500}, "scheduler.num_train_timesteps"),
        ("unet_device/config.json", {"cross_attention_dim": 64}, "device unet.cross_attention_dim"),
    ],
)
def test_each_mismatch_names_field_and_values(pair: tuple[Path, Path], rel: str, changes: dict, field: str) -> None:
    host, device = pair
    _edit(device / rel, **changes)
    with pytest.raises(CompatibilityError) as info:
        _check(host, device)
    err = info.value
    assert err.field.startswith(field), err.field
    (value,) = changes.values()
    assert err.device_value == value or field in ("vae.config_hash", "device unet.cross_attention_dim")
    assert repr(err.host_value) in str(err) and repr(err.device_value) in str(err)


def test_tokenizer_vocabulary_mismatch(pair: tuple[Path, Path]) -> None:
    host, device = pair
    vocab = json.loads((device / "tokenizer" / "vocab.json").read_text())
    vocab["zebra</w>"] = len(vocab)
    (device / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CompatibilityError, match="tokenizer.hash"):
        _check(host, device)


def test_missing_paths_are_clear(tmp_path: Path, tiny_family: Path) -> None:
    with pytest.raises(FamilyNotFoundError, match="not found"):
        family.resolve(tmp_path / "nope")
    with pytest.raises(FamilyNotFoundError, match="model_index.json"):
        family.resolve(tmp_path)
    with pytest.raises(RelaydiffError, match="unknown variant 'medium'.*device, host"):
        family.resolve(tiny_family, "medium")


def test_plain_pipeline_folder_resolves_to_unet(pair: tuple[Path, Path]) -> None:
    host, _ = pair
    (host / "family.json").unlink()
    ref = family.resolve(host, role="device")
    assert ref.unet_subfolder == "unet"
    with pytest.raises(RelaydiffError, match="no family.json"):
        family.resolve(host, "device")


def test_family_id_is_stable_and_shared(pair: tuple[Path, Path]) -> None:
    host, device = pair
    h, d = family.resolve(host), family.resolve(device, role="device")
    assert family.family_id(h) == family.family_id(d)
    _edit(device / "vae" / "config.json", scaling_factor=0.3)
    assert family.family_id(h) != family.family_id(d)
