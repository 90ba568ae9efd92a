"""Tests of the embedded family: tokenizer, architecture FLOP budget, and a micro training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from relaydiff.embedded.models import FamilyArch, build_unet, unet_flops  # noqa: E402
from relaydiff.embedded.tokenizer import build_tokenizer, learn_merges  # noqa: E402
from relaydiff.embedded.train import TrainConfig, main, train_family  # noqa: E402
from relaydiff.world import sample_prompts, vocabulary  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(vocabulary(), d, max_length=32)
    return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)


def test_every_grammar_word_is_one_token(tokenizer) -> None:
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_prompts_round_trip_with_special_tokens(tokenizer) -> None:
    for prompt in sample_prompts(3, 20):
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(prompt.split()) + 2
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == prompt
    assert tokenizer.model_max_length == 32


def test_unknown_text_is_not_lost(tokenizer) -> None:
    ids = tokenizer("zebra 42!", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == "zebra42!"


def test_learn_merges_rejects_whitespace() -> None:
    with pytest.raises(ValueError, match="'a b'"):
        learn_merges(["a b"])


def test_default_device_unet_flops_at_most_quarter_of_host() -> None:
    arch = FamilyArch()
    torch.manual_seed(0)
    host = build_unet(arch, arch.host)
    dev = build_unet(arch, arch.device)
    ratio = unet_flops(arch, dev) / unet_flops(arch, host)
    assert ratio <= 0.25, ratio
    assert sum(p.numel() for p in host.parameters()) > 4 * sum(p.numel() for p in dev.parameters())


def test_scaled_budget_rejects_nonpositive() -> None:
    with pytest.raises(ValueError, match="-1"):
        TrainConfig().scaled(-1)


def test_micro_training_run_writes_a_loadable_family(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = train_family(TrainConfig.micro(seed=0), tmp_path / "fam", resume=False)
    family = json.loads((out / "family.json").read_text())
    assert family["format"] == "relaydiff-family/1"
    assert family["variants"] == {"host": "unet", "device": "unet_device"}
    assert family["resolution"] == 32
    stages = family["training"]["stages"]
    for name in ("vae", "host", "device"):
        curve = stages[name]["loss_curve"]
        first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert last < 0.9 * first, (name, curve)
    assert not (out / "checkpoints").exists()

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.config.sample_size == 8
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == TrainConfig.micro().arch.vae.latent_channels
    assert pipe.vae.config.scaling_factor == pytest.approx(stages["vae"]["scaling_factor"])
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    dev = UNet2DConditionModel.from_pretrained(str(out / "unet_device"), local_files_only=True)
    assert dev.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    image = pipe("a small red circle on the left", num_inference_steps=2, height=32, width=32,
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_cli_resume_is_a_no_op_for_finished_stages(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    args = ["--out", str(out), "--micro", "--keep-checkpoints"]
    assert main(args) == 0
    before = json.loads((out / "family.json").read_text())["training"]["stages"]
    assert main(args + ["--resume"]) == 0
    after = json.loads((out / "family.json").read_text())["training"]["stages"]
    assert after == before


def test_resume_with_larger_budget_continues_and_redoes_later_stages(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = replace(TrainConfig.micro(seed=1), keep_checkpoints=True)
    cfg = replace(cfg, vae=replace(cfg.vae, max_steps=6), host=replace(cfg.host, max_steps=6),
                  device=replace(cfg.device, max_steps=6))
    out = train_family(cfg, tmp_path / "fam")
    device_file = out / "unet_device" / "diffusion_pytorch_model.safetensors"
    before = device_file.read_bytes()
    longer = replace(cfg, host=replace(cfg.host, max_steps=9))
    train_family(longer, out, resume=True)
    stages = json.loads((out / "family.json").read_text())["training"]["stages"]
    assert (stages["vae"]["steps"], stages["host"]["steps"], stages["device"]["steps"]) == (6, 9, 6)
    assert device_file.read_bytes() != before  # retrained on the new text encoder


def test_check_failures_names_what_fails() -> None:
    import numpy as np

    from relaydiff.embedded.evaluate import check_failures
    from relaydiff.world import make_batch

    images, captions, _ = make_batch(3, 24, size=32, n_objects=2)
    truth = check_failures(images, captions)
    assert {"found", "shape", "size", "relation", "count"} <= set(truth)
    assert max(truth.values()) <= 0.1  # the scorer passes ground-truth renders (>= 98% of attributes)
    blank = check_failures(np.full_like(images, 128), captions)
    assert blank["found"] == 1.0 and blank["count"] == 1.0


def test_text_separation_measures_the_encoder(monkeypatch: Any) -> None:
    from relaydiff.core import family
    from relaydiff.embedded import evaluate

    fam = evaluate.load_family(family.default_family_dir())
    monkeypatch.setattr(evaluate, "SEPARATION_PROMPTS", {
        "same": ("a large red circle on the left",) * 3,
        "colour": ("a large red circle on the left", "a large blue circle on the left"),
    })
    got = evaluate.text_separation(fam)
    assert got["same"] == 0.0
    assert got["colour"] > 1.0


def test_scene_targets_follow_the_grammar() -> None:
    from relaydiff.embedded.train import scene_classes, scene_targets

    y = scene_targets(["a large red circle on the left", "a small blue square above a large green triangle on a white background"])
    classes = scene_classes()
    assert y.shape == (2, len(classes)) and all(int(y[:, i].max()) < c for i, c in enumerate(classes))
    one, two = y.tolist()
    assert one[3:9] == [0] * 6 and one[9] > 0 and one[10:] == [0, 0, 0]  # one object, a position, no relation
    assert two[3] > 0 and two[9] == 0 and two[10] > 0 and two[12] > 0  # second object, a relation, a background
    assert one[0] != two[0] and one[1] != two[1]  # red circle vs blue square


def test_micro_run_with_text_stage_and_aux_loss(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = TrainConfig.micro(seed=2)
    cfg = replace(cfg, text=replace(cfg.text, minutes=1.0, max_steps=30, batch_size=32, lr=3e-3), text_aux_weight=0.1,
                  vae=replace(cfg.vae, max_steps=4), host=replace(cfg.host, max_steps=4), device=replace(cfg.device, max_steps=4))
    out = train_family(cfg, tmp_path / "fam", resume=False)
    stages = json.loads((out / "family.json").read_text())["training"]["stages"]
    curve = stages["text"]["loss_curve"]
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, curve  # scene parsing is learned
    assert stages["text"]["parse_acc"] > 0.3
    assert "aux_parse_acc" in stages["host"]  # the host stage kept the parsing loss on


def test_device_stage_distillation_and_timestep_range(tmp_path: Path) -> None:
    import torch
    from dataclasses import replace

    from relaydiff.embedded.models import build_unet
    from relaydiff.embedded.train import _diffusion_loss_fn

    cfg = TrainConfig.micro(seed=3)
    cfg = replace(cfg, device=replace(cfg.device, max_steps=3), vae=replace(cfg.vae, max_steps=3),
                  host=replace(cfg.host, max_steps=3), device_kd_weight=1.0, keep_checkpoints=False)
    out = train_family(cfg, tmp_path / "fam", resume=False)
    assert "kd_mse" in json.loads((out / "family.json").read_text())["training"]["stages"]["device"]

    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    text = CLIPTextModel.from_pretrained(str(out / "text_encoder")).eval()
    unet = build_unet(cfg.arch, cfg.arch.device).eval()
    other = build_unet(cfg.arch, cfg.arch.device).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def run(teacher: Any, weight: float) -> tuple[float, dict[str, float]]:
        torch.manual_seed(0)
        fn = _diffusion_loss_fn(cfg, "device", unet, text, tok, vae, train_text=False, teacher=teacher,
                                kd_weight=weight)
        with torch.no_grad():
            loss, extra = fn(0)
        return float(loss), extra

    plain, _ = run(None, 0.0)
    same, same_extra = run(unet, 1.0)  # a teacher that agrees adds nothing
    assert same_extra["kd_mse"] == 0.0 and same == pytest.approx(plain)
    differ, differ_extra = run(other, 2.0)
    assert differ_extra["kd_mse"] > 0 and differ > plain

    class Recorder(torch.nn.Module):  # the UNet, noting the timesteps it is asked about
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.seen = unet, []

        def forward(self, z: Any, t: Any, encoder_hidden_states: Any) -> Any:
            self.seen.append(t)
            return self.inner(z, t, encoder_hidden_states=encoder_hidden_states)

    rec = Recorder()
    with torch.no_grad():
        for step in range(4):
            _diffusion_loss_fn(cfg, "device", rec, text, tok, vae, train_text=False, max_timestep=300)(step)
    seen = torch.cat(rec.seen)
    assert int(seen.max()) < 300 and len(seen) == 4 * cfg.device.batch_size


@pytest.mark.parametrize("argv, named", [
    (["--text-aux-weight", "-1"], "--text-aux-weight must be >= 0, got -1.0"),
    (["--device-kd-weight", "nan"], "--device-kd-weight must be >= 0, got nan"),
    (["--device-max-timestep", "1001"], "--device-max-timestep must be in 0..1000, got 1001"),
    (["--device-minutes", "0"], "--device-minutes must be > 0, got 0.0"),
])
def test_family_train_rejects_bad_options(argv: list[str], named: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "fam"), "--micro", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "fam").exists()


def test_training_sampler_of_the_family_uses_the_train_split() -> None:
    from relaydiff.embedded.train import TrainConfig, _batch
    from relaydiff.world import split_of

    cfg = TrainConfig.micro()
    caps = [c for step in range(30) for c in _batch(cfg, "host", step, 16)[1]]
    assert {split_of(c) for c in caps} == {"train"}


def test_partial_snapshot_resumes_from_committed_weights_alone(tmp_path: Path, monkeypatch: Any) -> None:
    import shutil
    from dataclasses import replace

    import relaydiff.embedded.train as train

    cfg = TrainConfig.micro(seed=2)
    cfg = replace(cfg, checkpoint_every_s=0.0, vae=replace(cfg.vae, max_steps=3),
                  host=replace(cfg.host, max_steps=6), device=replace(cfg.device, max_steps=2))
    real = train._diffusion_loss_fn

    def crashing(cfg_: Any, stage: str, *a: Any, **k: Any):  # the process dies during host step 4
        fn = real(cfg_, stage, *a, **k)

        def loss_fn(step: int):
            if stage == "host" and step == 4:
                raise KeyboardInterrupt
            return fn(step)

        return loss_fn

    monkeypatch.setattr(train, "_diffusion_loss_fn", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_family(cfg, tmp_path / "run")
    monkeypatch.setattr(train, "_diffusion_loss_fn", real)
    snap = tmp_path / "snapshot"  # what a session commits: the folder without checkpoints/
    shutil.copytree(tmp_path / "run", snap, ignore=shutil.ignore_patterns("checkpoints"))
    progress = json.loads((snap / "family.json").read_text())["training"]
    assert progress["complete"] is False
    assert progress["stages"]["host"]["partial"] is True and progress["stages"]["host"]["steps"] == 4
    assert "partial" not in progress["stages"]["vae"] and "device" not in progress["stages"]
    vae_bytes = (snap / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()

    out = train_family(cfg, tmp_path / "next", resume_from=snap)
    family = json.loads((out / "family.json").read_text())["training"]
    assert family["complete"] is True
    stages = family["stages"]
    assert stages["vae"]["steps"] == 3 and stages["host"]["steps"] == 6 and stages["device"]["steps"] == 2
    assert "partial" not in stages["host"]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_bytes  # kept, not retrained
    assert stages["host"]["samples_seen"] == 6 * cfg.host.batch_size


def test_resume_from_rejects_a_folder_of_another_architecture(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from relaydiff.embedded.train import read_progress

    out = train_family(TrainConfig.micro(seed=0), tmp_path / "fam", resume=False)
    with pytest.raises(ValueError, match="architecture"):
        read_progress(out, TrainConfig())
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "b"), "--resume-from", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_object_weights_mark_objects_and_their_rim() -> None:
    from relaydiff.embedded.train import object_weights

    x = -torch.ones(1, 3, 8, 8)
    x[0, :, 3, 3] = 1.0  # one white pixel on black
    w = object_weights(x, 9.0)[0, 0]
    assert w[3, 3] == 10.0 and w[2, 2] == 10.0 and w[4, 4] == 10.0  # the pixel and its 1-px rim
    assert w[0, 0] == 1.0 and w[6, 6] == 1.0 and int((w == 10.0).sum()) == 9


def test_probes_on_a_tiny_random_family(tiny_family: Path) -> None:
    from relaydiff.embedded.evaluate import load_family
    from relaydiff.embedded.probes import denoise_error, swap_probe, trajectories, vae_roundtrip, val_prompts
    from relaydiff.world import split_of

    torch.set_num_threads(1)
    fam = load_family(tiny_family)
    prompts = val_prompts(4)
    assert {split_of(p) for p in prompts} == {"val"}
    out = swap_probe(fam, prompts, steps=3, single=(1,), relay=(0, 3))
    assert len(out["gap_by_step"]) == 3 and all(g >= 0 for g in out["gap_by_step"])
    same = out["relay"]["3"]  # the device runs no step: the host's own images
    assert same["changed_verdicts"] == 0.0 and tuple(same["minus_host"]) == (0.0, 0.0, 0.0) and same["psnr_to_host"] == 60.0
    assert out["relay"]["0"]["psnr_to_host"] < 60.0  # device-only differs
    with pytest.raises(ValueError, match="one entry per step"):
        trajectories(fam, prompts, plan=["host"], steps=3)
    err = denoise_error(fam, n=4, timesteps=(100, 900))
    assert set(err) == {"host", "device"} and set(err["host"]) == {"100", "900"}
    vae = vae_roundtrip(fam, n_per_count=3)
    assert [vae[f"{m}obj"]["exact"] for m in (1, 2, 3)] == [1.0, 1.0, 1.0]  # the scorer passes exact renders
