"""Reading a mobile bundle: its manifest, the checks that it is intact, and opening its artifacts.

This is the device's side of a bundle (what a phone ships); ``relaydiff.export.bundle`` builds one.
A bundle folder holds ``<target>/<precision>/<files>``, ``parity/<component>.safetensors`` (inputs
drawn from a held-out relay and the torch fp32 outputs on them), ``manifest.json`` (:class:`~relaydiff.runtime.manifest.Manifest`, schema ``manifest.schema.json``)
and ``manifest.sha256``.

:func:`verify` re-checks sizes, hashes and the schema, refuses files outside the folder and files the
manifest does not list, and re-runs parity where the runtime exists on this OS (ONNX via onnxruntime,
.pte via ExecuTorch; CoreML only on macOS). Nothing in a bundle is unpickled or evaluated: the manifest
is capped JSON and the fixtures are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.metrics import Tolerance, compare
from relaydiff.runtime.manifest import (  # noqa: F401  (re-exported: what a bundle reader needs, in one import)
    FORMAT,
    MANIFEST,
    MANIFEST_HASH,
    MAX_MANIFEST_BYTES,
    SCHEMA_PATH,
    VERSION,
    ArtifactEntry,
    BundleError,
    Manifest,
    load_schema,
    read_manifest,
    schema_problems,
    version_problem,
)
from relaydiff.runtime.gates import recheck
from relaydiff.runtime.sessions import ArtifactSession, RuntimeUnavailableError

TARGETS = ("onnx", "coreml", "executorch")
PRECISIONS = ("fp32", "int8")
COMPONENTS = ("unet_step", "vae_decoder", "text_encoder")
CACHE_COMPONENTS = ("unet_step_full", "unet_step_cached")  # feature caching's pair (docs/cache.md), with the manifest's cache section
SAFETY_COMPONENT = "safety_checker"  # the family's image safety checker (runtime.safety), with the manifest's safety_checker section
FAMILY_CONFIGS = ("model_index.json", "family.json", "scheduler/scheduler_config.json", "vae/config.json",
                  "text_encoder/config.json", "tokenizer/tokenizer_config.json")


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
    files = [f for f in FAMILY_CONFIGS if (root / f).is_file()]
    files += sorted(p.relative_to(root).as_posix() for p in root.glob("unet*/config.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    return h.hexdigest(), files


# -------------------------------------------------------------------------------------------- artifacts


def runnable_files(entry: ArtifactEntry) -> list[str]:
    """The bundle-relative files of one manifest artifact that run on their own: the primary file, and its .ort sibling."""
    return entry.runnable_files()


class FailedArtifactError(BundleError):
    """An artifact the build marked ``failed`` (``--allow-failing``) was asked to run."""


def require_usable(entry: ArtifactEntry) -> None:
    """Raise FailedArtifactError naming the gates a ``failed`` artifact missed."""
    if entry.status == "failed":
        missed = "; ".join(g.describe() for g in entry.failed_gates()) or "status 'failed'"
        raise FailedArtifactError(f"artifact {entry.name} ({entry.file}) failed its build gates ({missed}); the bundle was built "
                                  "with --allow-failing: rebuild it (e.g. with more --calibration-prompts) or use another "
                                  "target or precision")


def open_session(root: Path, entry: ArtifactEntry, file: str | None = None, *, threads: int = 1,
                 allow_failed: bool = False) -> ArtifactSession:
    """Load one runnable file of a manifest artifact (default: its primary file).

    Raises:
        FailedArtifactError: the artifact is marked ``failed`` and ``allow_failed`` is off (conformance tools measure
            failed artifacts; nothing that serves images runs one).
    """
    if not allow_failed:
        require_usable(entry)
    target = "onnx" if (file or entry.file).endswith(".ort") else entry.target
    return ArtifactSession(root / (file or entry.file), target, [t.name for t in entry.inputs], [t.name for t in entry.outputs],
                           threads=threads)


def load_fixture(root: Path, manifest: Manifest, component: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, torch fp32 reference outputs) of the bundle's parity fixture for ``component``."""
    from safetensors.numpy import load_file

    e = manifest.fixture(component)
    if e is None:
        raise BundleError(f"the bundle has no parity fixture for component {component!r}")
    data = load_file(str(root / e.file))
    inputs = {k[len("input."):]: v for k, v in data.items() if k.startswith("input.")}
    return inputs, {k[len("reference."):]: v for k, v in data.items() if k.startswith("reference.")}


def find_family(root: Path, manifest: Manifest, family: Path | None = None) -> Path | None:
    """The family folder the bundle was built from: ``family`` if given, else the one its artifacts' metadata records
    (a path relative to the metadata file, so it is found while bundle and family keep their relative places).

    A folder counts only if its config hash is the manifest's (a family folder rebuilt differently is not the reference).

    Raises:
        BundleError: ``family`` was given but is not the bundle's family.
    """
    want = manifest.family.config_hash
    if family is not None:
        if not family.is_dir():
            raise BundleError(f"family folder '{family}' does not exist")
        got, _ = family_config_hash(family)
        if got != want:
            raise BundleError(f"family '{family}' has config hash {got[:16]}...; the bundle was built from {want[:16]}...")
        return family
    for art in manifest.artifacts:
        for e in art.extra_files:
            if not e.file.endswith(".json"):
                continue
            try:
                recorded = json.loads((root / e.file).read_text()).get("metadata", {}).get("family_root")
            except (OSError, json.JSONDecodeError):
                continue
            if not isinstance(recorded, str) or not recorded:
                continue
            folder = ((root / e.file).parent / recorded).resolve()  # written relative to the JSON file's folder
            if folder.is_dir() and family_config_hash(folder)[0] == want:
                return folder
    return None


def fixture_parity(got: Mapping[str, np.ndarray], fixture: Mapping[str, np.ndarray], tol: Tolerance) -> dict[str, Any]:
    """Every ``reference.<output>`` of a parity fixture against ``got``: figures per output and whether all pass."""
    out: dict[str, Any] = {"run": True, "passed": True}
    for key, ref in fixture.items():
        if not key.startswith("reference."):
            continue
        name = key[len("reference."):]
        c = compare(np.asarray(got[name]), ref, tol)
        out[name] = {"max_abs": _json_number(c.max_abs, 7), "psnr_db": _json_number(c.psnr_db, 3)}
        out["passed"] = bool(out["passed"] and c.passed)
    return out


def _json_number(value: float, digits: int) -> float | None:
    """``value`` rounded, or None when it is not finite (NaN and infinities are not JSON)."""
    return round(value, digits) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found."""

    bundle: Path
    problems: list[str] = field(default_factory=list)  # each names the file it is about
    checked_files: int = 0
    parity: list[dict[str, Any]] = field(default_factory=list)  # one row per artifact: target, precision, component, figures
    manifest: Manifest | None = None  # the manifest read, once it matched its schema
    gates: list[dict[str, Any]] = field(default_factory=list)  # one row per artifact: its status and recorded gates

    @property
    def ok(self) -> bool:
        """The bundle is intact (hashes, schema, listed files, parity re-run); gate failures are :attr:`gates_ok`."""
        return not self.problems

    @property
    def failed_artifacts(self) -> list[str]:
        return [row["artifact"] for row in self.gates if row["status"] == "failed"]

    @property
    def gates_ok(self) -> bool:
        return not self.failed_artifacts

    def to_json(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "ok": self.ok, "gates_ok": self.gates_ok, "problems": self.problems,
                "checked_files": self.checked_files, "parity": self.parity, "gates": self.gates,
                "failed_artifacts": self.failed_artifacts}


def verify(folder: str | Path, *, parity: bool = True, trusted_key: str | Path | None = None) -> VerifyReport:
    """Check a bundle folder: manifest hash and schema, every listed file's size and sha256, no unlisted files, parity;
    with ``trusted_key`` (an Ed25519 public key PEM) also that ``manifest.sig`` is that key's signature over
    ``manifest.sha256`` (:mod:`relaydiff.runtime.signing`): an unsigned, re-signed or tampered bundle then fails.

    Raises:
        BundleError: the manifest cannot be read at all, or ``trusted_key`` is not an Ed25519 public key PEM (every
            other finding goes into the report).
    """
    from relaydiff.runtime.signing import SIGNATURE, load_public_key, signature_problem

    root = Path(folder).resolve()
    key = load_public_key(trusted_key) if trusted_key is not None else None
    report = VerifyReport(root)
    raw = read_manifest(root)
    text = (root / MANIFEST).read_bytes()
    hash_file = root / MANIFEST_HASH
    if not hash_file.is_file():
        report.problems.append(f"{MANIFEST_HASH}: missing")
    elif hash_file.read_text().split()[:1] != [hashlib.sha256(text).hexdigest()]:
        report.problems.append(f"{MANIFEST}: content does not match {MANIFEST_HASH} (the manifest was modified)")
    if key is not None:
        wrong = signature_problem(root, key)
        if wrong is not None:
            report.problems.append(wrong)
    old = version_problem(raw)
    if old is not None:
        raise BundleError(f"'{root / MANIFEST}': {old}")
    schema_errs = schema_problems(raw)
    report.problems += [f"{MANIFEST}: schema: {e}" for e in schema_errs]
    if schema_errs:
        return report
    manifest = report.manifest = Manifest._from_valid(raw)
    listed: set[Path] = {root / MANIFEST, root / MANIFEST_HASH, root / SIGNATURE}
    for e in manifest.files():
        path = _inside(root, e.file)
        if path is None:
            report.problems.append(f"{e.file}: path leaves the bundle folder")
            continue
        listed.add(path)
        if not path.exists():
            report.problems.append(f"{e.file}: missing")
            continue
        digest, size = sha256_path(path)
        report.checked_files += 1
        if size != e.size:
            report.problems.append(f"{e.file}: size {size} differs from the manifest's {e.size}")
        if digest != e.sha256:
            report.problems.append(f"{e.file}: sha256 {digest[:16]}... differs from the manifest's {e.sha256[:16]}...")
    for p in sorted(root.rglob("*")):
        if p.parent == root and p.suffix == ".zip" and p.is_file():
            _check_archive(p, text, report)  # the bundle's own zip (build writes <folder>/<folder name>.zip)
        elif p.is_file() and p not in listed and not any(d in listed for d in p.parents):
            report.problems.append(f"{p.relative_to(root).as_posix()}: not listed in the manifest")
    for art in manifest.artifacts:
        wrong = art.status_problem()
        if wrong:
            report.problems.append(wrong)
        report.problems += [f"{art.file}: {p}" for p in recheck(art.gates)]
        report.gates.append({"artifact": art.name, "file": art.file, "status": art.status, "gates": [g.to_json() for g in art.gates]})
    if parity and report.ok:
        _verify_parity(root, manifest, report)
    return report


def _check_archive(path: Path, manifest_text: bytes, report: VerifyReport) -> None:
    """A zip at the bundle's top level must be this bundle: its manifest.json byte-identical to the folder's."""
    import zipfile

    name = path.name
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if MANIFEST not in names:
                report.problems.append(f"{name}: a zip without {MANIFEST} (not this bundle's archive)")
            elif z.getinfo(MANIFEST).file_size > MAX_MANIFEST_BYTES or z.read(MANIFEST) != manifest_text:
                report.problems.append(f"{name}: its {MANIFEST} differs from the folder's (an archive of another build)")
            elif any(n.endswith(".zip") for n in names):
                report.problems.append(f"{name}: holds a zip (the archive must not contain itself)")
    except zipfile.BadZipFile as exc:
        report.problems.append(f"{name}: not a zip file ({exc})")


def _inside(root: Path, rel: str) -> Path | None:
    if rel.startswith("/") or "\\" in rel or any(part in ("..", "") for part in rel.split("/")):
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) else None


def _verify_parity(root: Path, manifest: Manifest, report: VerifyReport) -> None:
    """Re-run every artifact this OS can run on its component's fixture, against the stored torch outputs."""
    from safetensors.numpy import load_file

    fixtures = {e.component: load_file(str(root / e.file)) for e in manifest.parity_fixtures}
    for art in manifest.artifacts:
        row: dict[str, Any] = {"target": art.target, "precision": art.precision, "component": art.component, "file": art.file}
        fixture = fixtures.get(art.component)
        if fixture is None:
            report.problems.append(f"{art.file}: no parity fixture for component {art.component!r}")
            continue
        inputs = {k[len("input."):]: v for k, v in fixture.items() if k.startswith("input.")}
        try:
            got = open_session(root, art, allow_failed=True)(inputs)  # verify measures failed artifacts too
        except RuntimeUnavailableError as exc:
            row["run"] = False
            row["reason"] = str(exc)
            report.parity.append(row)
            continue
        row.update(fixture_parity(got, fixture, art.tolerance))
        report.parity.append(row)
        if not row["passed"]:
            report.problems.append(f"{art.file}: parity outside tolerance ({art.tolerance.describe()}): {row}")
