"""Optional bundle signing: an Ed25519 signature over a bundle's ``manifest.sha256``, in ``manifest.sig``.

``manifest.sha256`` commits to ``manifest.json``, which commits to every file's size and sha256, so one
signature over its exact bytes covers the whole bundle. Without a signature the hashes only show that a bundle
is self-consistent: whoever replaces a file can recompute them. With a trusted public key
(``relaydiff bundle verify --trusted-key``, the device's ``--trusted-key``) a bundle is accepted only if
``manifest.sig`` is a valid signature of that key over ``manifest.sha256``: unsigned, re-signed (another key)
and tampered bundles are refused. Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key);
the ``cryptography`` package does the cryptography.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from relaydiff.runtime.manifest import MANIFEST_HASH, BundleError

SIGNATURE = "manifest.sig"  # 64 raw bytes: Ed25519 over the bytes of manifest.sha256
SIGNATURE_BYTES = 64
MAX_KEY_BYTES = 16 * 1024  # a PEM key is a few hundred bytes
PRIVATE_KEY = "bundle-signing.key.pem"
PUBLIC_KEY = "bundle-signing.pub.pem"


def keygen(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out_dir`` (private key mode 0600); returns (private, public) paths.

    Raises:
        BundleError: a key file already exists there (never overwritten), or the folder cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    priv_path, pub_path = out / PRIVATE_KEY, out / PUBLIC_KEY
    for p in (priv_path, pub_path):
        if p.exists():
            raise BundleError(f"'{p}' already exists: refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        pub_path.write_bytes(public)
    except OSError as exc:
        raise BundleError(f"cannot write keys into '{out}': {exc.strerror or exc}") from None
    return priv_path, pub_path


def _read_key(path: str | Path, kind: str) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_KEY_BYTES:
            raise BundleError(f"{kind} key '{p}' is larger than {MAX_KEY_BYTES} bytes: not a PEM key")
        return p.read_bytes()
    except OSError as exc:
        raise BundleError(f"{kind} key '{p}' cannot be read: {exc.strerror or exc}") from None


def load_private_key(path: str | Path) -> Any:
    """The Ed25519 private key of a PEM file (unencrypted PKCS#8)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"private key '{path}' is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"private key '{path}' is a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Any:
    """The Ed25519 public key of a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"trusted key '{path}' is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"trusted key '{path}' is a {type(key).__name__}, expected an Ed25519 public key")
    return key


def sign(bundle_dir: str | Path, key_path: str | Path) -> Path:
    """Sign a bundle that verifies (hashes and schema; parity is not re-run): writes ``manifest.sig``.

    Raises:
        BundleError: the bundle does not verify (the problems are listed), or the key is not usable.
    """
    from relaydiff.runtime.bundle import verify

    root = Path(bundle_dir).resolve()
    key = load_private_key(key_path)
    report = verify(root, parity=False)
    if not report.ok:
        raise BundleError(f"bundle '{root}' does not verify: refusing to sign it", report.problems)
    sig = root / SIGNATURE
    try:
        sig.write_bytes(key.sign((root / MANIFEST_HASH).read_bytes()))
    except OSError as exc:
        raise BundleError(f"cannot write '{sig}': {exc.strerror or exc}") from None
    return sig


def signature_problem(root: Path, trusted_key: Any) -> str | None:
    """Why the bundle at ``root`` is not signed by ``trusted_key`` (an Ed25519PublicKey), or None when it is."""
    from cryptography.exceptions import InvalidSignature

    sig_path, hash_path = root / SIGNATURE, root / MANIFEST_HASH
    if not sig_path.is_file():
        return f"{SIGNATURE}: missing (the bundle is not signed, and a trusted key is required)"
    if sig_path.stat().st_size != SIGNATURE_BYTES:
        return f"{SIGNATURE}: {sig_path.stat().st_size} bytes, expected an Ed25519 signature of {SIGNATURE_BYTES}"
    if not hash_path.is_file():
        return f"{SIGNATURE}: nothing to check it against ({MANIFEST_HASH} is missing)"
    try:
        trusted_key.verify(sig_path.read_bytes(), hash_path.read_bytes())
    except InvalidSignature:
        return (f"{SIGNATURE}: not a signature of the trusted key over {MANIFEST_HASH} "
                "(signed by another key, or the bundle was modified after signing)")
    return None
