"""Reading a mobile bundle: its manifest, the checks that it is intact, and opening its artifacts.

This is the device's side of a bundle (what a phone ships); ``relaydiff.export.bundle`` builds one.
A bundle folder holds ``<target>/<precision>/<files>``, ``parity/<component>.safetensors`` (inputs
drawn from a held-out relay and the torch fp32 outputs on them), ``manifest.json`` (schema:
``manifest.schema.json`` beside this file) and ``manifest.sha256``.

:func:`verify` re-checks sizes, hashes and the schema, refuses files outside the folder and files the
manifest does not list, and re-runs parity where the runtime exists on this OS (ONNX via onnxruntime,
.pte via ExecuTorch; CoreML only on macOS). Nothing in a bundle is unpickled or evaluated: the manifest
is capped JSON and the fixtures are safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.metrics import Tolerance, compare
from relaydiff.runtime.sessions import ArtifactSession, RuntimeUnavailableError

FORMAT = "relaydiff-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB: a manifest of 64 artifacts is ~100 KiB
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
TARGETS = ("onnx", "coreml", "executorch")
PRECISIONS = ("fp32", "int8")
COMPONENTS = ("unet_step", "vae_decoder", "text_encoder")
FAMILY_CONFIGS = ("model_index.json", "family.json", "scheduler/scheduler_config.json", "vae/config.json",
                  "text_encoder/config.json", "tokenizer/tokenizer_config.json")


class BundleError(RelaydiffError):
    """A bundle could not be built, or did not verify (``problems`` lists every finding)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = tuple(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{message}{lines}")


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


# --------------------------------------------------------------------------------------------------- schema


def load_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return data


def schema_problems(manifest: Any, schema: Mapping[str, Any] | None = None) -> list[str]:
    """Every place ``manifest`` breaks the manifest schema (JSON Schema 2020-12, checked by ``jsonschema``), as "path: problem"."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema or load_schema())
    return [f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(manifest)]


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


# -------------------------------------------------------------------------------------------- artifacts


def runnable_files(entry: Mapping[str, Any]) -> list[str]:
    """The bundle-relative files of one manifest artifact that run on their own: the primary file, and its .ort sibling."""
    files = [entry["file"]]
    if entry["target"] == "onnx":
        files += [e["file"] for e in entry.get("extra_files", ()) if e["file"].endswith(".ort")]
    return files


def open_session(root: Path, entry: Mapping[str, Any], file: str | None = None, *, threads: int = 1) -> ArtifactSession:
    """Load one runnable file of a manifest artifact (default: its primary file)."""
    target = "onnx" if (file or entry["file"]).endswith(".ort") else entry["target"]
    return ArtifactSession(root / (file or entry["file"]), target, [t["name"] for t in entry["inputs"]],
                           [t["name"] for t in entry["outputs"]], threads=threads)


def load_fixture(root: Path, manifest: Mapping[str, Any], component: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, torch fp32 reference outputs) of the bundle's parity fixture for ``component``."""
    from safetensors.numpy import load_file

    for e in manifest["parity_fixtures"]:
        if e["component"] == component:
            data = load_file(str(root / e["file"]))
            inputs = {k[len("input."):]: v for k, v in data.items() if k.startswith("input.")}
            return inputs, {k[len("reference."):]: v for k, v in data.items() if k.startswith("reference.")}
    raise BundleError(f"the bundle has no parity fixture for component {component!r}")


def find_family(root: Path, manifest: Mapping[str, Any], family: Path | None = None) -> Path | None:
    """The family folder the bundle was built from: ``family`` if given, else the one its artifacts' metadata records.

    A folder counts only if its config hash is the manifest's (a family folder rebuilt differently is not the reference).

    Raises:
        BundleError: ``family`` was given but is not the bundle's family.
    """
    want = manifest["family"]["config_hash"]
    if family is not None:
        if not family.is_dir():
            raise BundleError(f"family folder '{family}' does not exist")
        got, _ = family_config_hash(family)
        if got != want:
            raise BundleError(f"family '{family}' has config hash {got[:16]}...; the bundle was built from {want[:16]}...")
        return family
    for art in manifest["artifacts"]:
        for e in art.get("extra_files", ()):
            if not e["file"].endswith(".json"):
                continue
            try:
                recorded = json.loads((root / e["file"]).read_text()).get("metadata", {}).get("family_root")
            except (OSError, json.JSONDecodeError):
                continue
            if recorded and Path(recorded).is_dir() and family_config_hash(Path(recorded))[0] == want:
                return Path(recorded)
    return None


def fixture_parity(got: Mapping[str, np.ndarray], fixture: Mapping[str, np.ndarray], tol: Tolerance) -> dict[str, Any]:
    """Every ``reference.<output>`` of a parity fixture against ``got``: figures per output and whether all pass."""
    out: dict[str, Any] = {"run": True, "passed": True}
    for key, ref in fixture.items():
        if not key.startswith("reference."):
            continue
        name = key[len("reference."):]
        c = compare(np.asarray(got[name]), ref, tol)
        out[name] = {"max_abs": round(c.max_abs, 7), "psnr_db": round(c.psnr_db, 3)}
        out["passed"] = bool(out["passed"] and c.passed)
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
        tol = Tolerance.from_json(art["tolerance"])
        inputs = {k[len("input."):]: v for k, v in fixture.items() if k.startswith("input.")}
        try:
            got = open_session(root, art)(inputs)
        except RuntimeUnavailableError as exc:
            row["run"] = False
            row["reason"] = str(exc)
            report.parity.append(row)
            continue
        row.update(fixture_parity(got, fixture, tol))
        report.parity.append(row)
        if not row["passed"]:
            report.problems.append(f"{art['file']}: parity outside tolerance ({tol.describe()}): {row}")
