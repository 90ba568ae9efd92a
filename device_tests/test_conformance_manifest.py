"""(d) The manifest: verify() passes, every hash matches, and what it declares is what the family and the files are."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest


def test_verify_passes(bundle_dir: Path) -> None:
    from relaydiff.runtime.bundle import verify

    report = verify(bundle_dir)
    assert report.ok, "\n".join(report.problems)
    assert report.checked_files >= len(report.parity) > 0
    failed = [r for r in report.parity if r.get("run") and not r["passed"]]
    assert not failed, failed


def test_every_hash_matches(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Re-hash independently of verify(): manifest.sha256, then every listed file (folders by sorted path + file hash)."""
    text = (bundle_dir / "manifest.json").read_bytes()
    assert (bundle_dir / "manifest.sha256").read_text().split()[0] == hashlib.sha256(text).hexdigest()

    def digest(path: Path) -> tuple[str, int]:
        if path.is_file():
            data = path.read_bytes()
            return hashlib.sha256(data).hexdigest(), len(data)
        h, size = hashlib.sha256(), 0
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            d, n = digest(p)
            h.update(f"{p.relative_to(path).as_posix()}\0{d}\n".encode())
            size += n
        return h.hexdigest(), size

    entries = [*manifest["parity_fixtures"]]
    for art in manifest["artifacts"]:
        entries += [art, *art["extra_files"]]
    wrong = [e["file"] for e in entries if digest(bundle_dir / e["file"]) != (e["sha256"], e["size"])]
    assert len(entries) > 0 and not wrong, f"hash or size differs for {wrong}"


def test_signatures_are_the_family_components(manifest: dict[str, Any], pair: tuple[Any, Any]) -> None:
    """Every artifact's inputs/outputs (names, dtypes, shapes) are its component's declaration for this family."""
    from relaydiff.export.components import component_for

    device = pair[1]
    wrong = []
    for art in manifest["artifacts"]:
        sig = component_for(art["component"], device).signature(device)
        want = ([{"name": s.name, "dtype": s.dtype, "shape": list(s.concrete_shape)} for s in sig.inputs],
                [{"name": s.name, "dtype": s.dtype, "shape": list(s.concrete_shape)} for s in sig.outputs])
        if (art["inputs"], art["outputs"]) != want:
            wrong.append(f"{art['file']}: {art['inputs']} -> {art['outputs']}, expected {want}")
    assert not wrong, "\n".join(wrong)


def test_schedule_and_latent_are_the_family(manifest: dict[str, Any], pair: tuple[Any, Any]) -> None:
    from relaydiff.core.schedulers import build_scheduler
    from relaydiff.export.components import family_dims

    device = pair[1]
    scheduler = build_scheduler("ddim", device.scheduler_config)
    scheduler.set_timesteps(manifest["scheduler"]["steps"])
    assert manifest["scheduler"]["timesteps"] == [int(t) for t in scheduler.timesteps]
    d = family_dims(device)
    assert manifest["latent"]["shape"] == [1, d["C"], d["h"], d["w"]]
    assert manifest["latent"]["vae_scaling_factor"] == pytest.approx(float(device.vae.config.scaling_factor))
    assert manifest["family"]["id"] == device.family_id


@pytest.mark.artifacts(target="onnx")
def test_onnx_artifacts_have_an_ort_sibling(entry: dict[str, Any], bundle_dir: Path) -> None:
    """Issue 4: every ONNX artifact, fp32 and INT8, ships the ORT Mobile file and its operator list."""
    stem = entry["file"][: -len(".onnx")]
    listed = {e["file"] for e in entry["extra_files"]}
    assert f"{stem}.ort" in listed and f"{stem}.required_operators.config" in listed, sorted(listed)
    assert (bundle_dir / f"{stem}.ort").read_bytes()[4:8] == b"ORTM"  # flatbuffers file identifier of the ORT format


def test_student_section_is_the_family_student(manifest: dict[str, Any], pair: tuple[Any, Any]) -> None:
    """A bundle of a distilled student says so (its jumps on the bundle's grid) and ships a one-pass unet_step; others ship CFG."""
    from relaydiff.core.student import coarse_indices

    device, section = pair[1], manifest["relay"].get("student")
    steps = [a for a in manifest["artifacts"] if a["component"] == "unet_step"]
    inputs = {tuple(t["name"] for t in a["inputs"]) for a in steps}
    if device.student is None:
        assert section is None and inputs <= {("sample", "timestep", "text_embeds", "guidance_scale")}, (section, inputs)
        return
    k, n, m = manifest["relay"]["relay_step"], manifest["relay"]["steps"], device.student.student_steps
    assert section is not None, "the device variant is a student but the manifest has no relay.student"
    assert (section["relay_step"], section["steps"], section["student_steps"]) == (device.student.relay_step, device.student.steps, m)
    assert (section["relay_step"], section["steps"]) == (k, n)
    assert section["step_indices"] == coarse_indices(n, k, m)
    assert section["timesteps"] == [manifest["scheduler"]["timesteps"][i] for i in section["step_indices"]]
    assert inputs <= {("sample", "timestep", "text_embeds")}, inputs
    assert all(a["inputs"][2]["shape"][0] == 1 for a in steps)  # conditional embeddings only: no CFG batch


def test_every_artifact_carries_its_build_gates(manifest: dict[str, Any]) -> None:
    """The build applied the bars these tests use (relaydiff.runtime.gates) to every artifact and recorded the verdict."""
    from relaydiff.runtime.gates import Gate, gate_names, status_of

    wrong = []
    for art in manifest["artifacts"]:
        gates = [Gate.from_json(g) for g in art["gates"]]
        if tuple(g.name for g in gates) != gate_names(art["target"], art["precision"], art["component"]):
            wrong.append(f"{art['file']}: gates {[g.name for g in gates]}")
        if art["status"] != status_of(gates):
            wrong.append(f"{art['file']}: status {art['status']} but gates give {status_of(gates)}")
    assert manifest["artifacts"] and not wrong, "\n".join(wrong)
