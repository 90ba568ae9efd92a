"""Bad refinement input is refused with the value and what was expected."""

from __future__ import annotations

import math

import pytest
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.refine import check_strength, refine
from relaydiff.core.relay import encode_prompt, relay_side


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.5", True, None])
def test_strength_outside_the_range_is_refused(bad: object) -> None:
    with pytest.raises(RelaydiffError, match=r"outside \(0, 1\]; expected a number in \(0, 1\]") as info:
        check_strength(bad)
    assert repr(bad) in str(info.value)


def test_latent_of_the_wrong_space_is_refused(tiny_pair) -> None:
    host, _ = tiny_pair
    side = relay_side(host)
    c = side.denoiser.latent_spec.channels
    embeds = encode_prompt(host, "a red circle on the left")
    with pytest.raises(RelaydiffError, match=rf"expected \(B, {c}, h, w\)"):
        refine(side, torch.zeros(1, c + 1, 8, 8), embeds, strength=0.5, steps=4)
    with pytest.raises(RelaydiffError, match="NaN or Inf"):
        refine(side, torch.full((1, c, 8, 8), math.nan), embeds, strength=0.5, steps=4)
    with pytest.raises(RelaydiffError, match="none was given"):
        refine(side, None, embeds, strength=0.5, steps=4)
