"""The ``onnx`` and ``executorch`` device backends: a built bundle finishes relays like the torch backend does.

The tiny ONNX bundle of the session (``runtime_bundles``: fp32 and int8; unet_step, vae_decoder, text_encoder;
N = 10, k = 3) is built from the tiny family the host fixtures use, so a host and the bundle share a family id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from relaydiff.core.errors import CompatibilityError, RelaydiffError
from relaydiff.core.relay import RelayRequest, start
from relaydiff.runtime.artifact_denoiser import ArtifactDenoiser
from relaydiff.runtime.backends import create_backend
from relaydiff.runtime.device import DeviceRuntime
from relaydiff.runtime.settings import GenerationSettings

from runtime_bundles import RELAY, build_bundle

SLOW = pytest.mark.skipif(not os.environ.get("RELAYDIFF_SLOW"), reason="slow (ExecuTorch lowering, ~90 s): set RELAYDIFF_SLOW=1")


@pytest.fixture(scope="session")
def onnx_fp32(bundle: Path):  # type: ignore[no-untyped-def]
    return create_backend("onnx", bundle_dir=bundle, precision="fp32")


def _psnr(got: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((got.astype(np.float64) / 255 - ref.astype(np.float64) / 255) ** 2))
    return 100.0 if mse <= 1e-12 else 10 * np.log10(1 / mse)


def test_onnx_fp32_finishes_a_relay_like_torch(onnx_fp32, handoff) -> None:  # type: ignore[no-untyped-def]
    state, ref_latents, ref_image = handoff
    latents = onnx_fp32.finish(state)
    image = onnx_fp32.decode(latents)
    assert float((latents - ref_latents).abs().max()) < 1e-3
    assert image.dtype == np.uint8 and image.shape == ref_image.shape
    assert int(np.abs(image.astype(int) - ref_image.astype(int)).max()) <= 1


def test_onnx_int8_stays_within_30_db_of_torch(bundle, handoff) -> None:  # type: ignore[no-untyped-def]
    state, _ref_latents, ref_image = handoff
    int8 = create_backend("onnx", bundle_dir=bundle, precision="int8")
    assert _psnr(int8.decode(int8.finish(state)), ref_image) >= 30.0
    assert int8.bundle_id.endswith(":onnx:int8")


def test_identity_comes_from_the_manifest(onnx_fp32, bundle, tiny_pair) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    assert onnx_fp32.name == "onnxruntime" and onnx_fp32.family_id == tiny_pair[1].family_id
    assert onnx_fp32.bundle_sha256 == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    caps = DeviceRuntime(onnx_fp32).capabilities()
    assert caps.runtimes == ("onnxruntime",) and caps.bundle_id == onnx_fp32.bundle_id and caps.steps_per_second > 0


def test_prompts_go_through_the_bundles_text_encoder(onnx_fp32, tiny_pair) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.core.relay import encode_prompt

    got, ref = onnx_fp32.encode_prompt("a green triangle"), encode_prompt(tiny_pair[1], "a green triangle")
    assert all(float((g - r).abs().max()) < 1e-4 for g, r in zip(got, ref, strict=True))
    image = DeviceRuntime(onnx_fp32).generate(GenerationSettings(steps=4).request("a green triangle", 0))
    assert image.image.shape == (16, 16, 3) and image.steps == 4


def test_a_tampered_artifact_is_refused_with_its_name(bundle, tmp_path: Path) -> None:
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    path = copy / "onnx" / "fp32" / "unet_step.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RelaydiffError, match="onnx/fp32/unet_step.onnx: sha256"):
        create_backend("onnx", bundle_dir=copy)
    path.unlink()
    with pytest.raises(RelaydiffError, match="onnx/fp32/unet_step.onnx: missing"):
        create_backend("onnx", bundle_dir=copy)


def test_a_target_the_bundle_lacks_is_refused_listing_what_it_has(bundle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RelaydiffError, match="no executorch/fp32/unet_step artifact; it has: onnx/fp32/text_encoder"):
        create_backend("executorch", bundle_dir=bundle)
    with pytest.raises(RelaydiffError, match="unknown precision 'fp16'"):
        create_backend("onnx", bundle_dir=bundle, precision="fp16")


def test_a_state_with_other_latent_channels_is_refused(onnx_fp32, handoff) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import torch

    state = handoff[0]
    wide = dataclasses.replace(state, latents=torch.zeros(1, 8, *state.latents.shape[2:]))
    with pytest.raises(RelaydiffError, match=r"relay latent has shape \[1, 8, 8, 8\]; the bundle's unet_step takes \[1, 4, 8, 8\]"):
        onnx_fp32.finish(wide)
    with pytest.raises(CompatibilityError, match="family_id differs") as refused:
        onnx_fp32.finish(dataclasses.replace(state, family_id="another-family"))
    assert refused.value.to_json() == [{"field": "family_id", "host": "another-family", "device": onnx_fp32.family_id}]


def test_without_its_family_the_bundle_generates_alone(bundle, handoff, tiny_pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """As on a phone: no family folder; the bundle's tokenizer/ and text_encoder artifact encode prompts like the family."""
    from relaydiff.core.relay import encode_prompt

    monkeypatch.setattr("relaydiff.runtime.bundle.find_family", lambda *_a, **_k: None)
    backend = create_backend("onnx", bundle_dir=bundle)
    assert backend.finish(handoff[0]).shape == handoff[1].shape
    got, ref = backend.encode_prompt("a green triangle"), encode_prompt(tiny_pair[1], "a green triangle")
    assert all(float((g - r).abs().max()) < 1e-4 for g, r in zip(got, ref, strict=True))
    assert DeviceRuntime(backend).generate(GenerationSettings(steps=4).request("a green triangle", 0)).steps == 4


def test_without_tokenizer_or_family_it_relays_but_cannot_generate(bundle, handoff, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An old-style bundle without text_encoder and no family folder: relays only, and begin says why."""
    import hashlib
    import json

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["component"] != "text_encoder"]
    keep = {a["file"] for a in manifest["artifacts"]} | {e["file"] for a in manifest["artifacts"] for e in a["extra_files"]}
    for p in sorted(copy.rglob("*")):
        rel = p.relative_to(copy).as_posix()
        if p.is_file() and "text_encoder" in rel and rel not in keep and not rel.startswith("parity/"):
            p.unlink()
    text = json.dumps(manifest)
    (copy / "manifest.json").write_text(text)
    (copy / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")
    monkeypatch.setattr("relaydiff.runtime.bundle.find_family", lambda *_a, **_k: None)
    backend = create_backend("onnx", bundle_dir=copy)
    assert DeviceRuntime(backend).steps_per_second() > 0  # the Hello still gets a speed
    assert backend.finish(handoff[0]).shape == handoff[1].shape
    with pytest.raises(RelaydiffError, match="family folder was not found"):
        backend.begin(RelayRequest("x", relay_step=0, steps=4))


def test_relay_through_a_host_on_loopback(onnx_fp32, tiny_pair, make_host, link_config) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.core.relay import relay
    from relaydiff.runtime.client import RELAY as RELAYED
    from relaydiff.runtime.client import DeviceClient

    host = make_host(fraction=0.5, steps=4)

    async def main():  # type: ignore[no-untyped-def]
        async with host:
            client = DeviceClient(DeviceRuntime(onnx_fp32), host.url, auth_token="link-test-token",
                                  settings=GenerationSettings(steps=4), link_config=link_config)
            return await client.generate("a red circle")

    out = asyncio.run(asyncio.wait_for(main(), 60))
    assert out.mode == RELAYED and (out.relay_step, out.steps) == (2, 4)
    expected = relay(*tiny_pair, GenerationSettings(steps=4).request("a red circle", 2)).images[0]
    assert int(np.abs(out.image.astype(int) - expected.astype(int)).max()) <= 1


def test_device_command_runs_a_bundle(bundle, service_main, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens: the device generates alone with the bundle
    out = tmp_path / "alone.png"
    code = service_main(["device", "--connect", f"ws://127.0.0.1:{port}/", "--prompt", "a blue square", "--bundle", str(bundle),
                         "--precision", "int8", "--token", "bundle-test-token-0123", "--steps", "2", "--connect-timeout", "1", "--out", str(out), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["mode"] == "device-only" and out.is_file()
    assert service_main(["device", "--connect", "ws://127.0.0.1:1/", "--prompt", "x", "--backend", "onnx", "--token", "bundle-test-token-0123"]) == 2
    assert "pass --bundle DIR" in capsys.readouterr().out


@SLOW
def test_executorch_fp32_finishes_a_relay_like_torch(tiny_family, handoff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("executorch.runtime")
    folder = build_bundle(tiny_family, tmp_path / "et", ("executorch",), ("fp32",), ("unet_step", "vae_decoder"))
    backend = create_backend("executorch", bundle_dir=folder)
    state, ref_latents, ref_image = handoff
    latents = backend.finish(state)
    assert backend.name == "executorch" and float((latents - ref_latents).abs().max()) < 1e-3
    assert int(np.abs(backend.decode(latents).astype(int) - ref_image.astype(int)).max()) <= 1


@pytest.fixture(scope="module")
def student_bundle(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(host, torch student, ONNX fp32 bundle of the student): a student distilled in 4 updates on a copy of the tiny family."""
    import torch

    from relaydiff.core import family
    from relaydiff.export.bundle import BundleConfig, build
    from relaydiff.quantize.distill import DistillConfig, distill

    root = tmp_path_factory.mktemp("student") / "family"
    shutil.copytree(tiny_family, root)
    torch.manual_seed(0)
    distill(DistillConfig(family=root, student_steps=2, batch_size=4, updates_per_batch=4, buffer_batches=1, max_updates=4,
                          lr=1e-3, warmup=1, ema_decay=0.0, threads=1, **RELAY), progress=False)
    out = tmp_path_factory.mktemp("student-bundle") / "bundle"
    build(BundleConfig(family=root, out=out, precisions=("fp32",), components=("unet_step", "vae_decoder"), calibration_prompts=1,
                       eval_prompts=1, zip=False, device_variant="student", **RELAY), progress=False)
    host = family.load(family.resolve(root, role="host"))
    return host, family.load(family.resolve(root, "student", role="device"), share_with=host), out


def test_a_student_bundle_finishes_in_one_pass_per_jump_like_torch(student_bundle) -> None:  # type: ignore[no-untyped-def]
    host, student, folder = student_bundle
    backend = create_backend("onnx", bundle_dir=folder, precision="fp32")
    calls: list[dict[str, np.ndarray]] = []
    run, plain = backend._unet, backend.side.denoiser
    counting = ArtifactDenoiser(lambda inputs: calls.append(inputs) or run(inputs),  # count the artifact's passes
                                plain.latent_spec, plain.text_embed_dim, distilled=backend.distilled)
    backend.side = dataclasses.replace(backend.side, denoiser=counting)
    state = start(host, RelayRequest("a red circle on a blue field", guidance_scale=5.0, seed=3, **RELAY))
    latents = backend.finish(state)
    ref = create_backend("torch", model=student).finish(state)
    assert backend.distilled and len(calls) == 2  # two jumps, one conditional pass each (the teacher: 7 steps x CFG)
    assert all(c["text_embeds"].shape[0] == 1 and "guidance_scale" not in c for c in calls)
    assert float((latents - ref).abs().max()) < 1e-3


def test_a_student_bundle_for_another_relay_step_is_refused(student_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.export.bundle import BundleConfig, BundleError, build

    family_dir = student_bundle[1].ref.root
    with pytest.raises(BundleError, match=r"distilled for relay step 3 of 10.*--relay-step 3 --steps 10"):
        build(BundleConfig(family=family_dir, out=tmp_path / "b", relay_step=4, steps=10, device_variant="student", zip=False), progress=False)
