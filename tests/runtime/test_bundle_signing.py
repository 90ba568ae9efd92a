"""Optional bundle signing (relaydiff.runtime.signing): `bundle keygen`, `bundle sign`, and `bundle verify` / the
device runtime with a trusted key, which refuse unsigned, re-signed and tampered bundles. Keys are made in the test."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.backends import create_backend


def _cli(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from relaydiff.cli import main

    code = main([*argv, "--log-file", str(tmp_path / "log.txt")])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    code, out, _ = _cli(["bundle", "keygen", "--out", str(tmp_path / "ours"), "--json"], tmp_path, capsys)
    assert code == 0
    ours = json.loads(out)
    assert (Path(ours["private_key"]).stat().st_mode & 0o777) == 0o600
    code, out, _ = _cli(["bundle", "keygen", "--out", str(tmp_path / "theirs"), "--json"], tmp_path, capsys)
    theirs = json.loads(out)
    return {"priv": Path(ours["private_key"]), "pub": Path(ours["public_key"]), "other_priv": Path(theirs["private_key"])}


def test_signed_bundle_verifies_and_unsigned_resigned_or_tampered_ones_are_refused(
        bundle: Path, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    verify = ["bundle", "verify", str(copy), "--no-parity", "--trusted-key", str(keys["pub"])]

    code, _, err = _cli(verify, tmp_path, capsys)  # unsigned
    assert code == 1 and "manifest.sig: missing" in err and "Traceback" not in err
    assert _cli(["bundle", "verify", str(copy), "--no-parity"], tmp_path, capsys)[0] == 0  # no key asked: still fine

    assert _cli(["bundle", "sign", str(copy), "--key", str(keys["priv"])], tmp_path, capsys)[0] == 0
    assert _cli(verify, tmp_path, capsys)[0] == 0
    assert _cli(["bundle", "verify", str(copy), "--no-parity"], tmp_path, capsys)[0] == 0  # manifest.sig is not "unlisted"
    create_backend("onnx", bundle_dir=copy, trusted_key=keys["pub"])  # the device runtime accepts it

    signed = (copy / "manifest.sig").read_bytes()
    assert _cli(["bundle", "sign", str(copy), "--key", str(keys["other_priv"])], tmp_path, capsys)[0] == 0  # re-signed
    code, _, err = _cli(verify, tmp_path, capsys)
    assert code == 1 and "not a signature of the trusted key" in err
    with pytest.raises(RelaydiffError, match="not a signature of the trusted key"):
        create_backend("onnx", bundle_dir=copy, trusted_key=keys["pub"])

    # tampered after signing: a replaced decoder with the manifest and its hash recomputed (self-consistent again)
    (copy / "manifest.sig").write_bytes(signed)
    decoder = copy / "onnx" / "fp32" / "vae_decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    decoder.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    _rehash(manifest, "onnx/fp32/vae_decoder.onnx", hashlib.sha256(bytes(data)).hexdigest())
    text = json.dumps(manifest, indent=2)
    (copy / "manifest.json").write_text(text)
    (copy / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")
    assert _cli(["bundle", "verify", str(copy), "--no-parity"], tmp_path, capsys)[0] == 0  # hashes alone: fooled
    code, _, err = _cli(verify, tmp_path, capsys)
    assert code == 1 and "not a signature of the trusted key" in err
    with pytest.raises(RelaydiffError, match="does not verify"):
        create_backend("onnx", bundle_dir=copy, trusted_key=keys["pub"])


def _rehash(node: Any, file: str, digest: str) -> None:
    if isinstance(node, dict):
        if node.get("file") == file and "sha256" in node:
            node["sha256"] = digest
        for v in node.values():
            _rehash(v, file, digest)
    elif isinstance(node, list):
        for v in node:
            _rehash(v, file, digest)


def test_bad_keys_and_a_bundle_that_does_not_verify_are_refused_in_one_line(
        bundle: Path, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(["bundle", "keygen", "--out", str(keys["priv"].parent)], tmp_path, capsys)
    assert code != 0 and "refusing to overwrite" in err and "Traceback" not in err
    code, _, err = _cli(["bundle", "verify", str(bundle), "--no-parity", "--trusted-key", str(keys["priv"])], tmp_path, capsys)
    assert code != 0 and "not a PEM public key" in err and "Traceback" not in err
    code, _, err = _cli(["bundle", "sign", str(bundle), "--key", str(keys["pub"])], tmp_path, capsys)
    assert code != 0 and "not an unencrypted PEM private key" in err
    broken = shutil.copytree(bundle, tmp_path / "broken")
    (broken / "stray.bin").write_bytes(b"x")
    code, _, err = _cli(["bundle", "sign", str(broken), "--key", str(keys["priv"])], tmp_path, capsys)
    assert code != 0 and "refusing to sign" in err and "stray.bin" in err and not (broken / "manifest.sig").exists()
