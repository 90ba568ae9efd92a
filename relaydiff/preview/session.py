"""An editing session (DiffusionX): a device preview per round, the host refines the final one.

Per round the device model runs a few-step schedule (``preview_steps``). When the edit from the last
round is small (the reuse strength, fixed or predicted from the two prompts' text embeddings, is
below 1), the preview starts from the last round's latent re-noised to that strength instead of
from noise (:func:`relaydiff.core.refine.refine`). On :meth:`EditSession.final` the last preview's
latent goes to a :class:`Refiner` -- the host's large model, here in-process or over the link -- which
re-noises it to a refine strength (fixed or predicted) and runs the rest of its full schedule. A host
that cannot be reached leaves the preview as the result, and the outcome says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.refine import check_strength, refine
from relaydiff.core.relay import decode, encode_prompt, relay_side
from relaydiff.core.schedulers import sampler_spec
from relaydiff.core.state import latents_to_bytes

if TYPE_CHECKING:
    from relaydiff.core.family import LoadedModel
    from relaydiff.preview.predictor import StrengthPredictors

log = logging.getLogger(__name__)


class HostUnavailable(RelaydiffError):
    """The host could not refine (unreachable, closed, timed out); the preview stands as the result."""


class HostRefused(RelaydiffError):
    """The host answered the reverse hand-off with a request error (e.g. another family, no strength predictor)."""


@dataclass(frozen=True)
class EditConfig:
    """How a session previews and refines."""

    steps: int = 20  # N of the full schedule the host (and a device-only run) uses
    preview_steps: int = 5  # the device's few-step preview schedule
    sampler: str = "ddim"  # any of relaydiff.core.schedulers.SAMPLERS
    guidance_scale: float = 5.0  # classifier-free guidance on both sides
    seed: int = 0  # noise seed: every round and the refinement draw the same noise
    reuse_strength: float | None = 0.6  # device reuse strength for an edited round; None: the predictor's
    refine_strength: float | None = 0.5  # host refine strength; None: the predictor's
    reuse_max: float = 0.95  # a predicted reuse strength above this is a large edit: preview from noise

    def __post_init__(self) -> None:
        for name in ("steps", "preview_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RelaydiffError(f"{name} must be a positive integer, got {v!r}")
        sampler_spec(self.sampler)
        for name in ("reuse_strength", "refine_strength"):
            v = getattr(self, name)
            if v is not None:
                try:
                    check_strength(v)
                except RelaydiffError as exc:
                    raise RelaydiffError(f"{name}: {exc}") from None
        check_strength(self.reuse_max)


@dataclass
class Round:
    """One preview."""

    index: int
    prompt: str
    reused: bool  # started from the previous round's latent
    strength: float  # 1.0 from noise, else the reuse strength
    device_calls: int  # device denoiser calls (a CFG call is a batch of two)
    device_seconds: float
    latents: torch.Tensor = field(repr=False)
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8


@dataclass
class Final:
    """The session's result."""

    prompt: str
    source: str  # "host" (refined on the host) or "preview" (the host was unreachable or not asked)
    strength: float | None  # the refine strength the host used (None for a preview result)
    host_calls: int  # host denoiser calls, probe included
    host_seconds: float
    image: np.ndarray = field(repr=False)
    note: str = ""  # why the preview is the result, when it is

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "image"}


@dataclass(frozen=True)
class RefineReply:
    """What a refiner returns."""

    image: np.ndarray  # (H, W, 3) uint8
    latents: torch.Tensor | None  # the refined latent (None when only the image came back, over the link)
    strength: float  # the strength it used
    calls: int  # its denoiser calls, the predictor's probe included
    seconds: float


class Refiner(Protocol):
    """The host side of the final round: refine a device latent at a strength (None: the host's predictor decides)."""

    def __call__(self, latent: torch.Tensor, prompt: str, strength: float | None, config: EditConfig) -> RefineReply:
        """Raises HostUnavailable when it cannot be reached."""
        ...


def cfg_calls(calls: int, guidance_scale: float) -> int:
    """UNet evaluations of ``calls`` denoiser calls: a CFG call runs a batch of two."""
    return calls * (2 if guidance_scale > 1.0 else 1)


class LocalRefiner:
    """The host's large model in this process (for tests, evaluation, and a host-in-a-box ``relaydiff edit``)."""

    def __init__(self, host: LoadedModel, predictors: StrengthPredictors | None = None, *, device: LoadedModel | None = None) -> None:
        self.host = host
        self.predictors = predictors
        self.device = device  # for the predictor's disagreement probe

    def __call__(self, latent: torch.Tensor, prompt: str, strength: float | None, config: EditConfig) -> RefineReply:
        t0 = time.perf_counter()
        probe_calls = 0
        if strength is None:
            if self.predictors is None or self.device is None:
                raise RelaydiffError("no refine strength given and no predictor (with the device model) to choose one")
            from relaydiff.preview.predictor import refine_features

            feats = refine_features(self.host, self.device, latent, prompt, steps=config.steps, seed=config.seed)
            strength = self.predictors.refine_strength(feats)
            probe_calls = 1
        embeds = encode_prompt(self.host, prompt)
        out = refine(relay_side(self.host), latent, embeds if config.guidance_scale > 1.0 else (embeds[0], None),
                     strength=strength, steps=config.steps, sampler=config.sampler,
                     guidance_scale=config.guidance_scale, seed=config.seed)
        image = decode(self.host, out.latents)[0]
        calls = cfg_calls(out.plan.calls, config.guidance_scale) + probe_calls
        return RefineReply(image, out.latents, strength, calls, time.perf_counter() - t0)


class LinkRefiner:
    """The host over the link: a reverse hand-off (``RefineHandoff``) per final, its ``RefineResult`` back."""

    def __init__(self, url: str, *, auth_token: str, family_id: str, capabilities: Any, config: Any = None,
                 timeout_s: float = 120.0, ssl: Any = None) -> None:
        """``strength`` None in a call sends the hand-off without one: the host's predictor chooses it.
        ``ssl``: a client SSLContext for a ``wss://`` host (None: ``ws://``, or the system's trust)."""
        self.url, self.auth_token, self.family_id = url, auth_token, family_id
        self.capabilities, self.link_config, self.timeout_s, self.ssl = capabilities, config, timeout_s, ssl
        self._ids = 0

    def __call__(self, latent: torch.Tensor, prompt: str, strength: float | None, config: EditConfig) -> RefineReply:
        import asyncio
        import io

        from PIL import Image

        from relaydiff.link import Error, RefineHandoff, RefineResult
        from relaydiff.link.errors import ProtocolError
        from relaydiff.link.transport import LinkClosed, connect

        self._ids += 1
        handoff = RefineHandoff(f"refine-{self._ids}", latent=latents_to_bytes(latent.detach().float()), family_id=self.family_id, prompt=prompt,
                                             steps=config.steps, sampler=config.sampler,
                                             guidance_scale=config.guidance_scale, seed=config.seed, strength=strength)

        async def ask() -> RefineResult:
            link = await connect(self.url, auth_token=self.auth_token, capabilities=self.capabilities, config=self.link_config,
                                 ssl=self.ssl)
            try:
                await link.send(handoff)
                while True:
                    event = await link.recv()
                    if isinstance(event, RefineResult) and event.request_id == handoff.request_id:
                        return event
                    if isinstance(event, Error):
                        raise HostRefused(f"the host refused the refinement: {event.code}: {event.message}")
            finally:
                await link.close("done")

        t0 = time.perf_counter()
        try:
            got = asyncio.run(asyncio.wait_for(ask(), self.timeout_s))
        except (OSError, LinkClosed, TimeoutError, ProtocolError) as exc:
            raise HostUnavailable(f"{type(exc).__name__}: {exc}") from None
        image = np.asarray(Image.open(io.BytesIO(got.data)).convert("RGB"))
        return RefineReply(image, None, got.strength, got.host_unet_evals, time.perf_counter() - t0)


class EditSession:
    """Rounds of prompts previewed on the device; :meth:`final` asks a refiner (the host) for the last one."""

    def __init__(self, device: LoadedModel, config: EditConfig | None = None, *, refiner: Refiner | None = None,
                 predictors: StrengthPredictors | None = None) -> None:
        self.device = device
        self.config = config or EditConfig()
        self.refiner = refiner
        self.predictors = predictors
        if (self.config.reuse_strength is None) and predictors is None:
            raise RelaydiffError("reuse_strength None means the predictor's, but no predictors were given")
        self.rounds: list[Round] = []

    @property
    def last(self) -> Round | None:
        """The last good preview."""
        return self.rounds[-1] if self.rounds else None

    def _reuse(self, prompt: str) -> float | None:
        if self.last is None:
            return None
        if self.config.reuse_strength is not None:
            return self.config.reuse_strength
        assert self.predictors is not None
        from relaydiff.preview.predictor import reuse_features

        s = self.predictors.reuse_strength(reuse_features(self.device, self.last.prompt, prompt))
        return None if s > self.config.reuse_max else s

    def preview(self, prompt: str) -> Round:
        """Preview one round's prompt on the device.

        Raises:
            RelaydiffError: an empty prompt (the session keeps its last good preview).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise RelaydiffError(f"round {len(self.rounds) + 1} prompt is {prompt!r}; expected a non-empty prompt")
        c = self.config
        t0 = time.perf_counter()
        reuse = self._reuse(prompt)
        embeds = encode_prompt(self.device, prompt)
        side = relay_side(self.device)
        start = None if reuse is None else self.last.latents  # type: ignore[union-attr]
        out = refine(side, start, embeds if c.guidance_scale > 1.0 else (embeds[0], None), strength=reuse or 1.0,
                     steps=c.preview_steps, sampler=c.sampler, guidance_scale=c.guidance_scale, seed=c.seed)
        image = decode(self.device, out.latents)[0]
        r = Round(len(self.rounds), prompt, reuse is not None, reuse or 1.0, cfg_calls(out.plan.calls, c.guidance_scale),
                  time.perf_counter() - t0, out.latents, image)
        self.rounds.append(r)
        log.debug("round %d: %r reused=%s strength=%.2f", r.index, prompt, r.reused, r.strength)
        return r

    def final(self) -> Final:
        """Refine the last preview on the host; with no refiner or an unreachable host, the preview is the result."""
        last = self.last
        if last is None:
            raise RelaydiffError("a session needs at least one round before its final")
        if self.refiner is None:
            return Final(last.prompt, "preview", None, 0, 0.0, last.image, "no host configured: the preview is the result")
        try:
            reply = self.refiner(last.latents, last.prompt, self.config.refine_strength, self.config)
        except HostUnavailable as exc:
            return Final(last.prompt, "preview", None, 0, 0.0, last.image, f"host unreachable ({exc}): the preview is the result")
        except HostRefused as exc:
            return Final(last.prompt, "preview", None, 0, 0.0, last.image, f"{exc}: the preview is the result")
        return Final(last.prompt, "host", reply.strength, reply.calls, reply.seconds, reply.image)


def contact_sheet(images: list[np.ndarray], labels: list[str] | None = None, *, scale: int = 4) -> np.ndarray:
    """The images side by side (scaled up ``scale`` times, nearest), with a label strip under each when given."""
    from PIL import Image, ImageDraw

    if not images:
        raise RelaydiffError("a contact sheet needs at least one image")
    h, w = images[0].shape[:2]
    tw, th, strip = w * scale, h * scale, 14 if labels else 0
    sheet = Image.new("RGB", (tw * len(images) + 2 * (len(images) - 1), th + strip), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x = i * (tw + 2)
        sheet.paste(Image.fromarray(img).resize((tw, th), Image.Resampling.NEAREST), (x, 0))
        if labels:
            draw.text((x + 2, th + 1), labels[i][: max(4, tw // 6)], fill=(230, 230, 230))
    return np.asarray(sheet)


def write_session(session: EditSession, final: Final, out: Path) -> dict[str, Any]:
    """Write round_<i>.png, final.png, contact_sheet.png and session.json to ``out``; return the summary."""
    import json

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in session.rounds:
        path = out / f"round_{r.index + 1}.png"
        Image.fromarray(r.image).save(path)
        rounds.append({"round": r.index + 1, "prompt": r.prompt, "reused": r.reused, "strength": r.strength,
                       "device_unet_evals": r.device_calls, "device_seconds": round(r.device_seconds, 4), "png": path.name})
    Image.fromarray(final.image).save(out / "final.png")
    labels = [f"{r.index + 1}{'*' if r.reused else ''}" for r in session.rounds] + [f"final:{final.source}"]
    Image.fromarray(contact_sheet([r.image for r in session.rounds] + [final.image], labels)).save(out / "contact_sheet.png")
    summary = {"rounds": rounds, "final": {**final.summary(), "png": "final.png"}, "config": asdict(session.config),
               "contact_sheet": "contact_sheet.png"}
    (out / "session.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary
