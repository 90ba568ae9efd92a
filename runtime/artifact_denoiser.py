"""The device UNet as an exported ``unet_step`` artifact, called where the relay loop calls a UNet.

``unet_step`` computes classifier-free guidance inside the graph (one call per step on the latent,
[uncond, cond] embeddings and the scale); a distilled student's ``unet_step`` is one conditional pass.
:func:`unet_step_inputs` turns one loop call into the artifact's declared inputs; calibration records
exactly these inputs, so what is calibrated is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.sessions import Runner

if TYPE_CHECKING:
    import torch

Inputs = dict[str, np.ndarray]


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


class ArtifactUNet:
    """Stands in for ``model.unet`` in the relay loop: one ``unet_step`` call per step, CFG done inside the artifact.

    It returns the guided noise with batch 1, so the loop skips its own CFG combination. Without CFG (the
    loop passes batch 1) the artifact gets [cond, cond] and g = 1, so it returns the conditional noise.
    A ``distilled`` artifact (a student's ``unet_step``: no guidance input) gets the loop's batch-1 call as is.
    Attribute reads (``config``) go to ``unet``: the torch UNet, or any object with a ``config``.
    """

    def __init__(self, unet: Any, run: Runner, guidance_scale: float, *, distilled: bool = False) -> None:
        self._unet = unet
        self._run = run
        self._g = guidance_scale
        self._distilled = distilled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_kw: Any) -> Any:
        import torch

        single = x.shape[0] == 1 and encoder_hidden_states.shape[0] == 1
        if self._distilled:
            if not single:
                raise RelaydiffError(f"a distilled unet_step takes one conditional pass; the loop passed a batch of {x.shape[0]}")
            inputs = unet_step_inputs(x, t, encoder_hidden_states, self._g)
        elif single:  # no CFG: eps_c + 1 * (eps_c - eps_c)
            inputs = unet_step_inputs(torch.cat([x, x]), t, torch.cat([encoder_hidden_states] * 2), 1.0)
        else:
            inputs = unet_step_inputs(x, t, encoder_hidden_states, self._g)
        out = self._run(inputs)["noise_pred"]
        return _Sample(torch.from_numpy(np.ascontiguousarray(out)))


@dataclass(frozen=True)
class _Sample:
    sample: torch.Tensor
