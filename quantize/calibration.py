"""Relay-aware calibration sets: the inputs the device components really see after a hand-off.

A relayed device never runs the first k steps of a trajectory: the host does. Calibrating an INT8
UNet on whole device-only trajectories spends part of its activation ranges on high-noise inputs
(t near T) that the device never meets, and misses the distribution of latents the *host* UNet
produced. So the relay-aware set is captured from real relays:

1. for each world prompt, the host model runs steps [0, k) (``relaydiff.core.relay.snapshots``, one
   host trajectory serves every k in ``relay_steps``);
2. the device model resumes [k, N) (``relaydiff.core.relay.resume``) with a recording denoiser around
   its UNet, which stores the ``unet_step`` component's inputs (sample, timestep, [uncond, cond]
   embeddings, guidance) at each device step, exactly as the device loop calls the UNet;
3. the final latent of each relay is a ``vae_decoder`` calibration input; the prompt's token ids are a
   ``text_encoder`` input.

``mode="whole"`` gives the baseline: device-only trajectories, all N steps recorded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relaydiff.core.errors import RelaydiffError
from relaydiff.runtime.artifact_denoiser import Inputs, unet_step_inputs

if TYPE_CHECKING:
    import torch

    from relaydiff.core.denoiser import Conditioning, Denoiser, LatentSpec
    from relaydiff.core.family import LoadedModel
    from relaydiff.core.state import RelayState

MODES = ("relay", "whole")  # relay-aware (host [0,k), device [k,N)) or whole device-only trajectories


@dataclass(frozen=True)
class CalibrationConfig:
    """How a calibration set is drawn."""

    mode: str = "relay"  # "relay": record device steps [k, N) after a host hand-off; "whole": device-only [0, N)
    relay_steps: tuple[int, ...] = (8,)  # the hand-off steps k covered (ignored for mode="whole")
    steps: int = 25  # N: denoising steps of each trajectory
    prompts: int = 4  # number of world prompts (one trajectory per prompt and k)
    prompt_seed: int = 0  # seed of relaydiff.world.sample_prompts
    sampler: str = "ddim"  # relaydiff sampler name
    guidance_scale: float = 5.0  # classifier-free guidance scale (must be > 1: unet_step has CFG inside; a student ignores it)
    seed: int = 0  # seed of the first trajectory's initial noise; prompt i uses seed + i
    prompt_list: tuple[str, ...] = ()  # the user's own prompts (e.g. bundle build --calibration-prompts FILE); () = world prompts

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RelaydiffError(f"calibration mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise RelaydiffError(f"steps must be a positive integer, got {self.steps!r}")
        if self.mode == "relay":
            if not self.relay_steps:
                raise RelaydiffError("relay calibration needs at least one relay step")
            for k in self.relay_steps:
                if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.steps:
                    raise RelaydiffError(f"relay step {k!r} is outside [0, {self.steps}) (steps = {self.steps})")
        if self.prompt_list and len(self.prompt_list) != self.prompts:
            raise RelaydiffError(f"prompts ({self.prompts}) must be the length of prompt_list ({len(self.prompt_list)})")
        if isinstance(self.prompts, bool) or not isinstance(self.prompts, int) or self.prompts < 1:
            raise RelaydiffError(f"prompts must be a positive integer, got {self.prompts!r}")
        if not self.guidance_scale > 1.0:
            raise RelaydiffError(f"guidance scale must be > 1 (unet_step computes CFG), got {self.guidance_scale!r}")

    @property
    def device_steps(self) -> tuple[int, int]:
        """The range [first, N) of step indices recorded (first = min k, or 0 for whole trajectories)."""
        return (min(self.relay_steps) if self.mode == "relay" else 0, self.steps)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        listed = data.pop("prompt_list")  # the user's prompts are summarised, not copied into every manifest entry
        data["prompt_source"] = "list" if listed else "world"
        if listed:
            import hashlib

            data["prompt_list_sha256"] = hashlib.sha256("\n".join(listed).encode()).hexdigest()
        data["relay_steps"] = list(self.relay_steps)
        data["device_steps"] = list(self.device_steps)
        return data


@dataclass
class CalibrationSet:
    """Recorded component inputs, by component name, each a list of input dicts (declared names)."""

    config: CalibrationConfig
    samples: dict[str, list[Inputs]] = field(default_factory=dict)  # component -> inputs
    step_indices: list[int] = field(default_factory=list)  # step index i of each unet_step sample
    timesteps: list[int] = field(default_factory=list)  # timestep t of each unet_step sample
    prompts: list[str] = field(default_factory=list)  # the world prompts used

    def for_component(self, name: str) -> list[Inputs]:
        """The recorded inputs of component ``name``.

        Raises:
            RelaydiffError: nothing was recorded for ``name`` (lists what was).
        """
        if name not in self.samples:
            raise RelaydiffError(f"no calibration inputs for component {name!r}; recorded: {', '.join(sorted(self.samples))}")
        return self.samples[name]

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (written into artifact and bundle metadata)."""
        return {
            "config": self.config.to_json(),
            "counts": {k: len(v) for k, v in sorted(self.samples.items())},
            "step_range": [min(self.step_indices), max(self.step_indices) + 1] if self.step_indices else [],
            "timestep_range": [min(self.timesteps), max(self.timesteps)] if self.timesteps else [],
        }


class RecordingDenoiser:
    """A :class:`~relaydiff.core.denoiser.Denoiser` that calls ``record(x, t, text_embeds)`` before each call of the one it wraps."""

    def __init__(self, inner: Denoiser, record: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        self.inner = inner
        self._record = record

    @property
    def latent_spec(self) -> LatentSpec:
        return self.inner.latent_spec

    @property
    def text_embed_dim(self) -> int:
        return self.inner.text_embed_dim

    def __call__(self, latent: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        self._record(latent, timestep, conditioning.text_embeds)
        return self.inner(latent, timestep, conditioning)


def hand_offs(host: LoadedModel, device: LoadedModel, config: CalibrationConfig) -> Iterator[tuple[str, RelayState]]:
    """(prompt, relay state at the hand-off) for every prompt and relay step of ``config``.

    ``mode="relay"``: the host runs [0, k) once per prompt (snapshots at every k); ``mode="whole"``:
    the device itself starts at step 0.
    """
    from relaydiff.core.relay import RelayRequest, snapshots
    from relaydiff.world import sample_prompts

    ks = sorted(set(config.relay_steps)) if config.mode == "relay" else [0]
    first = host if config.mode == "relay" else device
    prompts = list(config.prompt_list) if config.prompt_list else sample_prompts(config.prompt_seed, config.prompts)
    for i, prompt in enumerate(prompts):
        req = RelayRequest(prompt=prompt, relay_step=ks[0], steps=config.steps, sampler=config.sampler,
                           guidance_scale=config.guidance_scale, seed=config.seed + i)
        for _k, (state, _s) in sorted(snapshots(first, req, ks).items()):
            yield prompt, state


def capture(host: LoadedModel, device: LoadedModel, config: CalibrationConfig, *, progress: bool = False) -> CalibrationSet:
    """Record the device components' inputs along real relayed (or whole device-only) trajectories.

    Args:
        host: the host model (runs [0, k) in ``mode="relay"``; unused for ``"whole"``).
        device: the device model whose UNet, decoder and text encoder are calibrated.
        config: prompts, steps, relay steps and mode.
    """
    from tqdm.auto import tqdm

    from relaydiff.core.relay import relay_side, resume
    from relaydiff.export.components import example_token_ids

    out = CalibrationSet(config, {"unet_step": [], "vae_decoder": [], "text_encoder": []})
    n_traj = config.prompts * (len(set(config.relay_steps)) if config.mode == "relay" else 1)
    for prompt, state in tqdm(hand_offs(host, device, config), total=n_traj, desc=f"calibration ({config.mode})",
                              disable=not progress, leave=False):
        order = iter(_device_step_indices(device, state.num_inference_steps, state.step_index))

        def record(x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, _g: float = state.guidance_scale,
                   _order: Any = order) -> None:
            out.samples["unet_step"].append(unet_step_inputs(x, t, embeds, _g))
            out.step_indices.append(next(_order))
            out.timesteps.append(int(t))

        side = relay_side(device)
        final = resume(dataclasses.replace(side, denoiser=RecordingDenoiser(side.denoiser, record)), state)
        out.samples["vae_decoder"].append({"latent": final.latents.float().numpy().copy()})
        if prompt not in out.prompts:
            out.prompts.append(prompt)
            out.samples["text_encoder"].append({"input_ids": example_token_ids(device, prompt)})
    return out


def _device_step_indices(device: LoadedModel, n: int, k: int) -> list[int]:
    """Grid indices at which the device calls its UNet from step k: every step, or a student's coarse jumps."""
    if device.student is None:
        return list(range(k, n))
    from relaydiff.core.student import coarse_indices

    return coarse_indices(n, k, device.student.student_steps)
