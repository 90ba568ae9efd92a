"""A diffusers UNet2DConditionModel split into a shallow branch and a deep part, for feature caching.

DeepCache (Ma et al. 2024) observes that the deep features of a UNet change slowly between neighbouring
denoising steps while the shallow skip branch carries the fine detail. With ``cache_branch = b`` (a skip
branch, 0 = the shallowest) and L levels, one UNet pass is

1. embed the timestep; ``h = conv_in(x)``;
2. shallow down path: ``down_blocks[0..b]`` (their skip outputs are kept);
3. deep part: ``down_blocks[b+1..L-1]``, the mid block, ``up_blocks[0..L-2-b]``; its output D (the output of
   ``up_blocks[L-2-b]``, or of the mid block when b = L-1) is what a cache keeps;
4. shallow up path: ``up_blocks[L-1-b..L-1]`` on D and the shallow skips; ``conv_out``.

A full step runs 1-4 and returns D with the noise prediction; a cached step runs 1, 2 and 4 on a D it is
given. We call the UNet's own submodules in the order of ``UNet2DConditionModel.forward`` (diffusers 0.39)
rather than patch the model, so the split is explicit and the full step equals ``unet(...)`` (tests check).
The output of step 2 is the *probe*: computed on every step, cached or not, it is the cheap signal the
error heuristic watches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from relaydiff.core.errors import RelaydiffError

# Config fields whose non-default values add inputs our split forward does not pass on.
_UNSUPPORTED = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim_type": None,
    "time_embedding_act_fn": None,
    "center_input_sample": False,
}


@dataclass(frozen=True)
class Shallow:
    """What the shallow down path of one step produced (steps 1-2): enough to finish a cached step."""

    emb: torch.Tensor  # the time embedding of the step
    hidden: torch.Tensor  # output of down_blocks[b]: the deep part's input, and the probe
    skips: tuple[torch.Tensor, ...]  # every skip output so far (conv_in first), as the UNet keeps them
    upsample_size: tuple[int, int] | None  # forwarded when the latent is not a multiple of the UNet's factor


class SplitUNet:
    """A UNet2DConditionModel with its pass split at skip branch ``cache_branch``; see the module docstring.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (not modified).
        cache_branch: the skip branch b in [0, L - 1], L = ``len(unet.down_blocks)``.
    Raises:
        RelaydiffError: a branch outside that range, or a UNet config with extra conditioning inputs.
    """

    def __init__(self, unet: Any, cache_branch: int = 0) -> None:
        levels = len(unet.down_blocks)
        if isinstance(cache_branch, bool) or not isinstance(cache_branch, int) or not 0 <= cache_branch < levels:
            raise RelaydiffError(
                f"cache branch {cache_branch!r} does not exist in this UNet: it has {levels} levels, "
                f"so the branch must be in [0, {levels - 1}]"
            )
        for key, default in _UNSUPPORTED.items():
            if unet.config.get(key, default) != default:
                raise RelaydiffError(f"feature caching supports plain text-conditioned UNets; this one sets {key}={unet.config[key]!r}")
        self.unet = unet
        self.cache_branch = cache_branch
        self.levels = levels

    # -- the three parts -------------------------------------------------------------------------------------
    def shallow_down(self, x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> Shallow:
        """Steps 1-2: time embedding, conv_in and down_blocks[0..b]."""
        u = self.unet
        factor = 2**u.num_upsamplers
        upsample_size = None
        if any(d % factor for d in x.shape[-2:]):
            upsample_size = (-1, -1)  # marker: the deep/up parts forward the skip's size (UNet2DConditionModel does the same)
        emb = u.time_embedding(u.get_time_embed(sample=x, timestep=t), None)
        h = u.conv_in(x)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in u.down_blocks[: self.cache_branch + 1]:
            h, res = self._down(block, h, emb, embeds)
            skips += res
        return Shallow(emb, h, skips, upsample_size)

    def deep(self, s: Shallow, embeds: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Step 3: from the shallow output to D. Returns (D, the shallow path's skips left for step 4)."""
        u = self.unet
        h, skips = s.hidden, s.skips
        for block in u.down_blocks[self.cache_branch + 1 :]:
            h, res = self._down(block, h, s.emb, embeds)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, s.emb, encoder_hidden_states=embeds)
            else:
                h = u.mid_block(h, s.emb)
        n_up_deep = self.levels - 1 - self.cache_branch
        for block in u.up_blocks[:n_up_deep]:
            h, skips = self._up(block, h, skips, s, embeds, final=False)
        return h, skips

    def shallow_up(self, s: Shallow, deep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Step 4: up_blocks[L-1-b..L-1] on the deep features and the shallow skips, then conv_out."""
        u = self.unet
        n_up_deep = self.levels - 1 - self.cache_branch
        blocks = u.up_blocks[n_up_deep:]
        # the shallow up blocks consume the first skips; the rest (e.g. down_blocks[b]'s downsampler output)
        # belong to the deep up blocks, which a cached step does not run
        h, skips = deep, s.skips[: sum(len(b.resnets) for b in blocks)]
        for j, block in enumerate(blocks):
            h, skips = self._up(block, h, skips, s, embeds, final=j == len(blocks) - 1)
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    # -- whole steps -----------------------------------------------------------------------------------------
    def full(self, x: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A full pass: (noise prediction, deep features D, probe)."""
        s = self.shallow_down(x, t, embeds)
        deep, skips = self.deep(s, embeds)
        shallow_skips = Shallow(s.emb, s.hidden, skips, s.upsample_size)
        return self.shallow_up(shallow_skips, deep, embeds), deep, s.hidden

    def cached(self, s: Shallow, deep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """A cached pass: the noise prediction from a shallow down path and given deep features."""
        return self.shallow_up(s, deep, embeds)

    # -- block calls, as UNet2DConditionModel.forward makes them ----------------------------------------------
    @staticmethod
    def _down(block: Any, h: torch.Tensor, emb: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=embeds)
        return block(hidden_states=h, temb=emb)

    @staticmethod
    def _up(block: Any, h: torch.Tensor, skips: tuple[torch.Tensor, ...], s: Shallow, embeds: torch.Tensor, *,
            final: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if s.upsample_size is not None and not final else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=s.emb, res_hidden_states_tuple=res, encoder_hidden_states=embeds, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=s.emb, res_hidden_states_tuple=res, upsample_size=size)
        return h, skips

