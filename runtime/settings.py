"""What a generation runs with besides the prompt: steps, sampler, guidance, seed.

The link's ``GenerateRequest`` carries only the prompt and the device's preferences, so the host
decides these; a device that falls back to generating alone uses its own copy. Both sides
building the same :class:`GenerationSettings` is what makes a relayed image and a local one
comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from relaydiff.core.relay import RelayRequest


@dataclass(frozen=True)
class GenerationSettings:
    """The fixed part of every request a host (or a device on its own) runs."""

    steps: int = 25  # N: denoising steps of the whole trajectory
    sampler: str = "ddim"  # see relaydiff.core.schedulers.SAMPLERS
    guidance_scale: float = 5.0  # classifier-free guidance; <= 1 disables CFG
    seed: int = 0  # seed of the initial noise
    negative_prompt: str = ""  # the unconditional prompt for CFG

    def __post_init__(self) -> None:
        self.request("", 0)  # RelayRequest validates every field and quotes a bad value

    def request(self, prompt: str, relay_step: int) -> RelayRequest:
        """The relay request for ``prompt`` split at step ``relay_step``.

        Raises:
            RelaydiffError: ``relay_step`` outside [0, steps] (or a bad setting).
        """
        return RelayRequest(
            prompt=prompt, relay_step=relay_step, steps=self.steps, sampler=self.sampler,
            guidance_scale=self.guidance_scale, seed=self.seed, negative_prompt=self.negative_prompt,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (for logs and run configs)."""
        return asdict(self)
