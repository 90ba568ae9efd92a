"""Your own models: two plain diffusers pipeline folders (tiny random weights, built here) become a family;
pairs that cannot relay are refused with every mismatch; a state is refused by a device it does not fit."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from relaydiff.cli import main


@pytest.fixture(scope="module")
def pair(plain_pair: dict[str, Path]) -> dict[str, Path]:
    return plain_pair


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_family_init_from_two_pipelines_then_relay_with_their_scheduler(pair: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fam = tmp_path / "my-family"
    code, out, err = _run(capsys, "family", "init", "--host", str(pair["host"]), "--device", str(pair["device"]),
                          "--variant", f"small={pair['device']}", "--out", str(fam), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["variants"] == {"host": "unet", "device": "unet_device", "small": "unet_small"}
    assert info["default_sampler"] == "pndm"  # the folder's own scheduler, not DDIM
    assert json.loads((fam / "family.json").read_text())["default_device"] == "device"
    # the id is a content hash: the label (folder name) plays no part
    assert info["family_id"].startswith("fam-") and "my-family" not in info["family_id"]
    code, out, _ = _run(capsys, "relay", "--family", str(fam), "--prompt", "a red circle", "--steps", "4",
                        "--out", str(tmp_path / "r.png"), "--json")
    assert code == 0 and json.loads(out)["scheduler"] == "pndm" and json.loads(out)["family_id"] == info["family_id"]
    # and the plain pipelines relay directly too, with the same family id
    code, out, _ = _run(capsys, "relay", "--host", str(pair["host"]), "--device", str(pair["device"]), "--prompt", "x",
                        "--steps", "3", "--out", str(tmp_path / "p.png"), "--json")
    assert code == 0 and json.loads(out)["family_id"] == info["family_id"]


def test_family_init_refuses_a_pair_naming_every_mismatch(pair: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "refused"
    code, out, err = _run(capsys, "family", "init", "--host", str(pair["host"]), "--device", str(pair["bad"]),
                          "--out", str(out_dir), "--json")
    assert code == 1
    fields = {m["field"]: m for m in json.loads(out)["mismatches"]}
    assert {"vae.scaling_factor", "vae.weights_hash", "vae.config_hash"} <= set(fields)
    assert (fields["vae.scaling_factor"]["host"], fields["vae.scaling_factor"]["device"]) == (0.18215, 0.2)
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no temporary folder


def test_family_init_refuses_a_folder_that_is_not_a_pipeline(pair: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    (half / "model_index.json").write_text("{}")
    code, _, err = _run(capsys, "family", "init", "--host", str(pair["host"]), "--device", str(half),
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "missing unet/config.json (or transformer/config.json), vae/config.json, text_encoder/config.json, tokenizer" in err
    assert not (tmp_path / "o").exists()


def test_check_reports_every_mismatch_with_both_values(pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "check", "--host", str(pair["host"]), "--device", str(pair["bad"]), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    fields = [m["field"] for m in report["mismatches"]]
    assert {"vae.scaling_factor", "vae.weights_hash", "vae.config_hash"} <= set(fields) and len(fields) == len(set(fields))
    code, out, _ = _run(capsys, "check", "--host", str(pair["host"]), "--device", str(pair["bad"]))
    assert code == 1
    assert "vae.scaling_factor: host 0.18215, device 0.2" in out and "vae.weights_hash: host '" in out
    code, out, _ = _run(capsys, "check", "--host", str(pair["host"]), "--device", str(pair["device"]), "--json")
    assert code == 0 and json.loads(out)["mismatches"] == []


def test_a_plain_pipeline_is_refused_where_a_pair_is_needed(pair: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "relay", "--family", str(pair["host"]), "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "plain diffusers pipeline folder (no family.json)" in err and "family init" in err
    code, _, err = _run(capsys, "bundle", "build", "--family", str(pair["host"]), "--out", str(tmp_path / "b"))
    assert code == 2 and "plain diffusers pipeline folder" in err and not (tmp_path / "b").exists()


def test_host_without_device_names_what_is_missing(pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "relay", "--host", str(pair["host"]), "--prompt", "x")
    assert code == 2 and "needs a device: pass --device DIR" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_a_device_whose_vae_differs(pair: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s.st"
    code, _, err = _run(capsys, "relay", "--host", str(pair["host"]), "--device", str(pair["device"]), "--prompt", "x",
                        "--steps", "4", "--relay-step", "2", "--out", str(tmp_path / "a.png"), "--state-out", str(state))
    assert code == 0, err
    code, out, err = _run(capsys, "resume", "--state", str(state), "--device", str(pair["bad"]), "--out", str(tmp_path / "b.png"))
    assert code == 1 and "family_id: host 'fam-" in out and "Traceback" not in out + err
    assert not (tmp_path / "b.png").exists()
    code, out, _ = _run(capsys, "resume", "--state", str(state), "--device", str(pair["bad"]), "--out", str(tmp_path / "b.png"),
                        "--json")
    report = json.loads(out)  # exactly one JSON document: every mismatched field with both values
    (fid,) = [m for m in report["mismatches"] if m["field"] == "family_id"]
    assert code == 1 and report["ok"] is False and fid["host"] != fid["device"] and fid["device"].startswith("fam-")
    assert not (tmp_path / "b.png").exists()
    code, _, _ = _run(capsys, "resume", "--state", str(state), "--device", str(pair["device"]), "--out", str(tmp_path / "c.png"))
    assert code == 0


def test_host_refuses_a_plain_pipeline_folder_naming_what_is_missing(pair: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "host", "--family", str(pair["host"]), "--listen", "127.0.0.1:0", "--duration", "0.1")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "plain diffusers pipeline folder (no family.json)" in err and "a host UNet and a device UNet" in err
    assert "family init" in err and len(err.strip().splitlines()) == 1


def test_bundle_build_as_a_library_refuses_a_plain_pipeline_folder(pair: dict[str, Path], tmp_path: Path) -> None:
    from relaydiff.core.errors import RelaydiffError
    from relaydiff.export.bundle import BundleConfig, build

    out = tmp_path / "bundle"
    with pytest.raises(RelaydiffError, match=r"plain diffusers pipeline folder \(no family.json\).*a device variant to export"):
        build(BundleConfig(family=pair["host"], out=out, relay_step=2, steps=4))
    assert not out.exists()  # it did not export the host UNet as the device model


@pytest.fixture(scope="module")
def pndm_family(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from relaydiff.core.family import init_family

    return init_family(pair["host"], pair["device"], tmp_path_factory.mktemp("fam") / "pndm-family")


def test_host_and_device_default_to_the_family_folders_own_scheduler(pndm_family: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("host", "device"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "default: the family folder's own scheduler where supported, else ddim" in " ".join(capsys.readouterr().out.split())
    code, out, err = _run(capsys, "host", "--family", str(pndm_family), "--listen", "127.0.0.1:0", "--duration", "0.1",
                          "--steps", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["sampler"] == "pndm"  # PNDM, as the folder ships it: not DDIM
    code, out, _ = _run(capsys, "host", "--family", str(pndm_family), "--listen", "127.0.0.1:0", "--duration", "0.1",
                        "--steps", "4", "--scheduler", "euler", "--json")
    assert code == 0 and json.loads(out)["settings"]["sampler"] == "euler"  # a named one still wins
    token = tmp_path / "token"
    token.write_text("a-token-of-sixteen-chars")
    with socket.socket() as s:  # a port nobody listens on: the device generates alone, with the folder's sampler
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = _run(capsys, "device", "--connect", f"ws://127.0.0.1:{port}/", "--family", str(pndm_family),
                          "--token-file", str(token), "--prompt", "x", "--steps", "3", "--out", str(tmp_path / "d.png"),
                          "--connect-timeout", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["scheduler"] == "pndm" and report["mode"] == "device-only" and (tmp_path / "d.png").is_file()
