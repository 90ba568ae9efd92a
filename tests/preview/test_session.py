"""The editing session: previews per round, reuse of the last latent, host refinement, and the preview as fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.preview.session import EditConfig, EditSession, HostUnavailable, LocalRefiner, write_session

ROUNDS = ["a red circle on the left", "a blue circle on the left", "a blue square on the left"]
CFG = EditConfig(steps=6, preview_steps=3, reuse_strength=0.67, refine_strength=0.5)


def test_rounds_reuse_and_refine(tiny_pair, tmp_path: Path) -> None:
    host, device = tiny_pair
    session = EditSession(device, CFG, refiner=LocalRefiner(host))
    rounds = [session.preview(p) for p in ROUNDS]
    assert [r.reused for r in rounds] == [False, True, True]
    assert rounds[0].device_calls == 2 * 3  # CFG: a batch of two per step
    assert rounds[1].device_calls == 2 * 2  # round(0.67 * 3) steps from the last latent
    final = session.final()
    assert final.source == "host" and final.strength == 0.5 and final.host_calls == 2 * 3
    assert final.image.shape == rounds[-1].image.shape and final.image.dtype == np.uint8
    summary = write_session(session, final, tmp_path / "s")
    assert {p.name for p in (tmp_path / "s").iterdir()} >= {"round_1.png", "round_3.png", "final.png", "contact_sheet.png"}
    assert json.loads((tmp_path / "s" / "session.json").read_text())["final"]["source"] == "host"
    assert summary["rounds"][1]["strength"] == 0.67


def test_reused_preview_depends_on_the_previous_round(tiny_pair) -> None:
    _, device = tiny_pair
    a, b = EditSession(device, CFG), EditSession(device, CFG)
    a.preview(ROUNDS[0])
    b.preview(ROUNDS[2])
    ra, rb = a.preview(ROUNDS[1]), b.preview(ROUNDS[1])
    assert not torch.allclose(ra.latents, rb.latents, atol=1e-4)


def test_unreachable_host_leaves_the_preview_as_the_result(tiny_pair) -> None:
    _, device = tiny_pair

    def down(*_args: object) -> object:
        raise HostUnavailable("connection refused")

    session = EditSession(device, CFG, refiner=down)
    last = session.preview(ROUNDS[0])
    final = session.final()
    assert final.source == "preview" and "host unreachable" in final.note and "connection refused" in final.note
    assert np.array_equal(final.image, last.image) and final.host_calls == 0


def test_empty_round_is_refused_and_the_last_preview_kept(tiny_pair) -> None:
    _, device = tiny_pair
    session = EditSession(device, CFG)
    session.preview(ROUNDS[0])
    with pytest.raises(RelaydiffError, match=r"round 2 prompt is '  '; expected a non-empty prompt"):
        session.preview("  ")
    assert len(session.rounds) == 1 and session.last is not None and session.last.prompt == ROUNDS[0]
    with pytest.raises(RelaydiffError, match="at least one round"):
        EditSession(device, CFG).final()


@pytest.mark.parametrize("field", ["reuse_strength", "refine_strength"])
def test_bad_strength_in_the_config_is_refused(field: str) -> None:
    with pytest.raises(RelaydiffError, match=rf"{field}: strength 1.5 is outside \(0, 1\]"):
        EditConfig(**{field: 1.5})
