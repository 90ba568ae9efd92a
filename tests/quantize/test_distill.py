"""Distillation smoke run on the tiny family: the loss goes down, the student loads, relays in M passes, and is refused where it cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from relaydiff.cli import main
from relaydiff.core import family
from relaydiff.core.errors import RelaydiffError, RelayStateError
from relaydiff.core.relay import RelayRequest, relay, resume, start
from relaydiff.core.student import STUDENT_FILE, coarse_indices, ddim_jump, read_student
from relaydiff.quantize.distill import DistillConfig, distill


@pytest.fixture(scope="module")
def distilled(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    root = tmp_path_factory.mktemp("distill") / "family"
    shutil.copytree(tiny_family, root)
    torch.manual_seed(0)
    cfg = DistillConfig(family=root, relay_step=3, steps=8, student_steps=2, batch_size=4, updates_per_batch=12,
                        buffer_batches=1, max_updates=12, lr=1e-3, warmup=1, ema_decay=0.0, threads=1)
    return root, distill(cfg, progress=False)


def test_distillation_loss_goes_down_and_the_student_is_a_family_variant(distilled) -> None:  # type: ignore[no-untyped-def]
    root, info = distilled
    losses = info["training"]["loss_curve"]
    assert info["training"]["updates"] == 12 and losses[-1] < 0.8 * losses[0], losses
    assert (info["teacher_unet_passes"], info["student_unet_passes"]) == (10, 2)
    assert json.loads((root / "family.json").read_text())["variants"]["student"] == "unet_student"
    assert read_student(root / "unet_student").student_steps == 2
    family.check_pair(family.resolve(root, None, role="host"), family.resolve(root, "student", role="device"))


def test_the_student_relays_in_m_unet_passes_with_no_cfg(distilled) -> None:  # type: ignore[no-untyped-def]
    root, _ = distilled
    host = family.load(family.resolve(root, None, role="host"))
    student = family.load(family.resolve(root, "student", role="device"), share_with=host)
    batch_sizes: list[int] = []
    hook = student.unet.register_forward_pre_hook(lambda _m, args: batch_sizes.append(args[0].shape[0]))
    state = start(host, RelayRequest("a red circle", relay_step=3, steps=8, seed=1))
    out = resume(student, state)
    hook.remove()
    assert batch_sizes == [1, 1]  # two jumps, one conditional pass each
    assert out.step_index == 8 and torch.isfinite(out.latents).all()
    image = relay(host, student, RelayRequest("a red circle", relay_step=3, steps=8, seed=1)).images[0]
    assert image.shape == (16, 16, 3)
    with pytest.raises(RelayStateError, match="distilled on the 'ddim' sampler"):
        resume(student, start(host, RelayRequest("a red circle", relay_step=3, steps=8, sampler="euler", seed=1)))
    with pytest.raises(RelaydiffError, match="finishes the whole trajectory"):
        resume(student, state, end=5)


def test_coarse_grid_and_ddim_jump() -> None:
    assert coarse_indices(25, 8, 4) == [8, 12, 16, 20]
    assert coarse_indices(10, 8, 4) == [8, 9]
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(ddim_jump(x, eps, 0.3, 0.3), x, atol=1e-6)  # no move when the noise level stays
    x0 = ddim_jump(x, eps, 0.3, 1.0)
    assert torch.allclose(x0, (x - 0.7 ** 0.5 * eps) / 0.3 ** 0.5, atol=1e-5)


def test_bad_student_file_and_bad_config_are_refused(distilled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = distilled
    bad = tmp_path / "unet"
    bad.mkdir()
    (bad / STUDENT_FILE).write_text(json.dumps({**read_student(root / "unet_student").to_json(), "sampler": "euler"}))
    with pytest.raises(RelaydiffError, match="only 'ddim' students"):
        read_student(bad)
    with pytest.raises(RelaydiffError, match="student steps 9 exceed"):
        DistillConfig(family=root, relay_step=3, steps=8, student_steps=9)
    with pytest.raises(RelaydiffError, match="does not exist"):
        DistillConfig(family=tmp_path / "nope")


def test_distill_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["distill", "--family", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_lcm_consistency_function_boundary() -> None:
    from relaydiff.core.student import consistency_x0, lcm_scalings

    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    c_skip, c_out = lcm_scalings(0.0)
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)
    assert torch.allclose(consistency_x0(x, eps, 0.0, 0.5), x)  # f(x, 0) = x
    x0 = (x - 0.7 ** 0.5 * eps) / 0.3 ** 0.5
    assert torch.allclose(consistency_x0(x, eps, 641.0, 0.3), x0, atol=1e-5)  # far from 0, f is the x0 prediction


def test_lcm_distillation_writes_an_lcm_student_that_relays(distilled) -> None:  # type: ignore[no-untyped-def]
    root, _ = distilled
    torch.manual_seed(0)
    cfg = DistillConfig(family=root, relay_step=3, steps=8, student_steps=2, batch_size=4, updates_per_batch=6, buffer_batches=1,
                        max_updates=6, lr=1e-3, warmup=1, ema_decay=0.0, threads=1, method="lcm", variant="student_lcm",
                        subfolder="unet_student_lcm")
    info = distill(cfg, progress=False)
    losses = info["training"]["loss_curve"]
    assert info["method"] == "lcm" and info["parametrization"] == "lcm" and len(losses) == 6
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert read_student(root / "unet_student_lcm").timestep_scaling == 10.0
    assert json.loads((root / "family.json").read_text())["variants"]["student_lcm"] == "unet_student_lcm"
    host = family.load(family.resolve(root, None, role="host"))
    student = family.load(family.resolve(root, "student_lcm", role="device"), share_with=host)
    out = resume(student, start(host, RelayRequest("a red circle", relay_step=3, steps=8, seed=1)))
    assert out.step_index == 8 and torch.isfinite(out.latents).all()
    with pytest.raises(RelaydiffError, match="distillation method must be one of progressive, lcm"):
        DistillConfig(family=root, method="dmd")


def test_eval_distill_compares_every_device_half_from_one_hand_off(distilled, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root, _ = distilled
    code = main(["eval", "distill", "--family", str(root), "--prompts", "2", "--variants", "student", "--out-dir", str(tmp_path / "e"), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0
    summary = payload["summary"]
    assert [e["half"] for e in summary] == ["host-only", "teacher", "teacher, 2 jumps", "student"]
    assert [e["unet_passes"] for e in summary] == [10, 10, 4, 2]  # k = 3 of 8: 5 guided steps; 2 jumps with and without CFG
    assert summary[0]["psnr_vs_host_db"] is None and summary[0]["ssim_vs_host"] == pytest.approx(1.0)
    assert all(e["prompts"] == 2 and 0.0 <= e["attribute_accuracy"] <= 1.0 for e in summary)
    assert (tmp_path / "e" / "grid.png").is_file() and (tmp_path / "e" / "report.json").is_file()
    assert main(["eval", "distill", "--family", str(root), "--prompts", "1", "--variants", "device"]) == 2
    assert "is not a distilled student" in capsys.readouterr().err
