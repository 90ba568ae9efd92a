"""``eval preview`` on two tiny sessions: every policy is measured, costs add up, the report and sheet are written."""

from __future__ import annotations

from pathlib import Path

from relaydiff.preview.evaluate import FIXED, PreviewEvalConfig, bootstrap_ci, run_preview_eval, write_report
from relaydiff.preview.session import EditConfig


def test_policies_and_costs(tiny_pair, tmp_path: Path) -> None:
    host, device = tiny_pair
    cfg = PreviewEvalConfig(sessions=2, split="val", edit=EditConfig(steps=4, preview_steps=2, reuse_strength=0.5),
                            bootstrap=50)
    report = run_preview_eval(host, device, cfg)
    pol = report["policies"]
    assert set(pol) == {"host_every_round", "device_only", "preview_host_noise", *[f"preview_refine_{s}" for s in FIXED]}
    rounds = [len(r["rounds"]) for r in report["rows"]]
    assert pol["host_every_round"]["host_unet_evals_per_session"] == 2 * 4 * sum(rounds) / 2
    assert pol["device_only"]["host_unet_evals_per_session"] == 0
    assert pol["preview_host_noise"]["host_unet_evals_per_session"] == 2 * 4
    assert pol["preview_refine_0.5"]["host_unet_evals_per_session"] == 2 * 2
    assert pol["preview_refine_0.5"]["host_saving_vs_preview_host_noise"] == 0.5
    assert report["preview_over_device_only"] < 1
    paths = write_report(report, tmp_path)
    assert Path(paths["report"]).is_file() and Path(paths["contact_sheet"]).is_file()


def test_bootstrap_ci_brackets_the_mean() -> None:
    lo, hi = bootstrap_ci([0, 1, 1, 0, 1], 200)
    assert 0 <= lo <= 0.6 <= hi <= 1
