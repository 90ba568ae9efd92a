"""The device UNet as an exported ``unet_step`` artifact, behind the same Denoiser interface as a torch UNet; and the
cached-step pair ``unet_step_full``/``unet_step_cached`` behind the CachedStep interface (feature caching).

``unet_step`` computes classifier-free guidance inside the graph (one call per step on the latent,
[uncond, cond] embeddings and the scale); a distilled student's ``unet_step`` is one conditional pass.
:func:`unet_step_inputs` turns one loop call into the artifact's declared inputs; calibration records
exactly these inputs, so what is calibrated is what runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.sessions import Runner

if TYPE_CHECKING:
    import torch

    from relaydiff.core.denoiser import Conditioning, LatentSpec

Inputs = dict[str, np.ndarray]


ADDED = ("pooled_text_embeds", "time_ids", "pooled_projections")  # the added Conditioning fields, also the input names


def unet_step_inputs(x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance_scale: float) -> Inputs:
    """The ``unet_step`` component's inputs for one loop call, already scaled.

    A CFG batch [x, x] against [uncond, cond] gives the guided form (sample, timestep, text_embeds (2, L, D),
    guidance_scale); a batch of one against the conditional embeddings, as a distilled student's loop
    calls it, gives the distilled form (sample, timestep, text_embeds (1, L, D)).
    """
    if x.shape[0] == 1 and embeds.shape[0] == 1:
        return {
            "sample": x.detach().float().numpy().copy(),
            "timestep": np.array([float(t)], np.float32),
            "text_embeds": embeds.detach().float().numpy().copy(),
        }
    if embeds.shape[0] != 2 or x.shape[0] != 2:
        raise RelaydiffError(f"unet_step takes a CFG batch of 2 or a student's batch of 1; the loop passed "
                             f"latents of batch {x.shape[0]} and embeddings of batch {embeds.shape[0]}")
    return {
        "sample": x[:1].detach().float().numpy().copy(),
        "timestep": np.array([float(t)], np.float32),
        "text_embeds": embeds.detach().float().numpy().copy(),
        "guidance_scale": np.array([guidance_scale], np.float32),
    }


class ArtifactDenoiser:
    """A bundle's ``unet_step`` artifact as a :class:`~relaydiff.core.denoiser.GuidedDenoiser`.

    :meth:`guided` is one artifact call per step: the latent, [uncond, cond] embeddings and the scale, guidance
    computed inside the graph. A plain call (batch 1: no CFG, or a student's jump) runs the guided graph on
    [cond, cond] with g = 1, which is the conditional output, or a ``distilled`` artifact (a student's
    ``unet_step``: one conditional pass, no guidance input) as is.
    """

    def __init__(self, run: Runner, latent_spec: LatentSpec, text_embed_dim: int, *, distilled: bool = False,
                 added: tuple[str, ...] = ()) -> None:
        """
        Args:
            run: calls the artifact with inputs by declared name (an ArtifactSession, or anything alike).
            latent_spec: the latent space it was exported for.
            text_embed_dim: D of its (B, L, D) ``text_embeds`` input.
            distilled: the artifact is a student's ``unet_step`` (inputs sample, timestep, text_embeds (1, L, D)).
            added: the added conditioning it takes as [uncond, cond] inputs of the same names: SDXL's
                ("pooled_text_embeds", "time_ids"), SD3's ("pooled_projections"); () for SD 1.x/2.x.

        Raises:
            RelaydiffError: an unknown added-conditioning name, or added conditioning on a distilled artifact.
        """
        unknown = [n for n in added if n not in ADDED]
        if unknown or (added and distilled):
            raise RelaydiffError(f"added conditioning {list(added)}: expected names among {list(ADDED)}"
                                 + (" and no distilled artifact" if distilled else ""))
        self._run = run
        self._spec = latent_spec
        self._text_dim = int(text_embed_dim)
        self.distilled = distilled
        self.added = tuple(added)

    @property
    def latent_spec(self) -> LatentSpec:
        return self._spec

    @property
    def text_embed_dim(self) -> int:
        return self._text_dim

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        import torch

        _only_text(conditioning, self.added)
        if latent.shape[0] != 1 or conditioning.batch != 1:
            raise RelaydiffError(f"a unet_step artifact takes one latent per call; got a batch of {latent.shape[0]} "
                                 f"against {conditioning.batch} embeddings")
        emb = conditioning.text_embeds
        if self.distilled:
            return self._call(unet_step_inputs(latent, timestep, emb, 1.0))
        inputs = unet_step_inputs(torch.cat([latent, latent]), timestep, torch.cat([emb, emb]), 1.0)  # eps_c + 1 (eps_c - eps_c)
        return self._call({**inputs, **_added_inputs(self.added, conditioning, conditioning)})

    def guided(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning,
               guidance_scale: float) -> torch.Tensor:
        import torch

        _only_text(cond, self.added)
        _only_text(uncond, self.added)
        if self.distilled:
            raise RelaydiffError("a distilled unet_step has its guidance baked in: it takes one conditional pass, not a CFG pair")
        inputs = unet_step_inputs(torch.cat([latent, latent]), timestep, torch.cat([uncond.text_embeds, cond.text_embeds]),
                                  guidance_scale)
        return self._call({**inputs, **_added_inputs(self.added, cond, uncond)})

    def _call(self, inputs: Inputs) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(self._run(inputs)["noise_pred"]))


def _only_text(conditioning: Conditioning, added: tuple[str, ...] = ()) -> None:
    """Refuse a conditioning whose added fields are not exactly the ones the artifact takes (``added``)."""
    have = tuple(n for n in ADDED if getattr(conditioning, n) is not None)
    if set(have) != set(added):
        takes = f"text embeddings and {', '.join(added)}" if added else "text embeddings only"
        raise RelaydiffError(f"the unet_step artifact takes {takes}; the conditioning has "
                             f"{', '.join(have) if have else 'no added conditioning'}")


def _added_inputs(added: tuple[str, ...], cond: Conditioning, uncond: Conditioning) -> Inputs:
    """The [uncond, cond] rows of each added conditioning field, by input name."""
    import torch

    out: Inputs = {}
    for name in added:
        c, u = getattr(cond, name), getattr(uncond, name)
        out[name] = torch.cat([u, c]).detach().float().numpy().copy()
    return out


class ArtifactCachedStep:
    """A bundle's ``unet_step_full`` and ``unet_step_cached`` artifacts as a :class:`~relaydiff.core.caching.device.CachedStep`.

    Both graphs take the guided form (sample, timestep, [uncond, cond] embeddings, guidance scale); without CFG
    they run on [cond, cond] with g = 1, as :class:`ArtifactDenoiser` does. ``full`` returns the deep features of
    the batch of two, which the relay loop keeps (reused or forecast) and hands back to ``cached``.
    """

    def __init__(self, full: Runner, cached: Runner, deep_shape: tuple[int, ...]) -> None:
        """
        Args:
            full / cached: call the two artifacts with inputs by declared name (ArtifactSessions, or anything alike).
            deep_shape: the declared shape of ``deep_features`` (checked on what comes back and on what goes in).
        """
        self._full, self._cached = full, cached
        self.deep_shape = tuple(deep_shape)
        self.full_calls = 0  # how many full passes ran (a device reports it; tests count them)
        self.cached_calls = 0

    def full(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
             guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        out = self._full(_step_inputs(latent, timestep, cond, uncond, guidance_scale))
        deep = np.ascontiguousarray(out["deep_features"])
        if deep.shape != self.deep_shape:
            raise RelaydiffError(f"unet_step_full returned deep_features of shape {list(deep.shape)}; declared {list(self.deep_shape)}")
        self.full_calls += 1
        return torch.from_numpy(np.ascontiguousarray(out["noise_pred"])), torch.from_numpy(deep)

    def cached(self, latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
               guidance_scale: float, deep: torch.Tensor) -> torch.Tensor:
        import torch

        if tuple(deep.shape) != self.deep_shape:
            raise RelaydiffError(f"deep features of shape {list(deep.shape)} do not fit unet_step_cached ({list(self.deep_shape)})")
        inputs = _step_inputs(latent, timestep, cond, uncond, guidance_scale)
        inputs["deep_features"] = deep.detach().float().numpy().copy()
        self.cached_calls += 1
        return torch.from_numpy(np.ascontiguousarray(self._cached(inputs)["noise_pred"]))


def _step_inputs(latent: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                 guidance_scale: float) -> Inputs:
    import torch

    _only_text(cond)
    if latent.shape[0] != 1 or cond.batch != 1:
        raise RelaydiffError(f"a cached-step artifact takes one latent per call; got a batch of {latent.shape[0]}")
    if uncond is None:  # eps_c + 1 (eps_c - eps_c)
        return unet_step_inputs(torch.cat([latent, latent]), timestep, torch.cat([cond.text_embeds, cond.text_embeds]), 1.0)
    _only_text(uncond)
    return unet_step_inputs(torch.cat([latent, latent]), timestep, torch.cat([uncond.text_embeds, cond.text_embeds]), guidance_scale)
