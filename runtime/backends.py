"""Device backends: what actually runs the device model. Registered by name; ``torch`` is the reference.

A backend starts a trajectory on its own (``begin``: step 0, for device-only generation),
finishes a relayed one (``finish``: steps [k, N)) and decodes the final latent (``decode``).
``onnx`` and ``executorch`` (:class:`BundleBackend`) run the artifacts of a built bundle
(``relaydiff bundle build``) instead of torch; :func:`create_backend` refuses an unknown name with
the list of known ones.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from relaydiff.core.errors import RelaydiffError
from relaydiff.core.relay import RelayRequest
from relaydiff.core.state import RelayState

if TYPE_CHECKING:
    from relaydiff.core.caching.device import DeviceCache
    from relaydiff.runtime.safety import SafetyChecker
    from relaydiff.runtime.manifest import ArtifactEntry


@runtime_checkable
class Backend(Protocol):
    """The device model behind a small interface (thread-safe for concurrent calls)."""

    name: str  # the runtime name announced to the host, e.g. "torch", "onnxruntime"
    family_id: str  # the latent space the model belongs to (RelayState.family_id)
    bundle_id: str  # what is installed: an *id* for the Hello capabilities
    bundle_sha256: str  # 64 lowercase hex digits identifying the installed weights

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (cond, uncond), each (1, L, D)."""
        ...

    def begin(self, request: RelayRequest) -> RelayState:
        """The state at step 0 of ``request`` (prompt encoded, initial noise drawn): device-only generation."""
        ...

    def finish(self, state: RelayState) -> torch.Tensor:
        """Run steps [k, N) of a relayed, validated state; the final latent (B, C, H, W). Refuses a state it cannot
        continue with :func:`relaydiff.core.family.check_state` (the built-in backends run it through ``relay.resume``)."""
        ...

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode a final latent to (B, H, W, 3) uint8 images."""
        ...


BackendFactory = Callable[..., Backend]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class decorator: make a backend available to :func:`create_backend` under ``name``."""

    def wrap(factory: BackendFactory) -> BackendFactory:
        if name in BACKENDS:
            raise RelaydiffError(f"backend {name!r} is already registered")
        BACKENDS[name] = factory
        return factory

    return wrap


def create_backend(name: str, **options: Any) -> Backend:
    """Build the backend registered as ``name`` with its keyword options.

    Raises:
        RelaydiffError: ``name`` is not registered (the message lists the known backends).
    """
    factory = BACKENDS.get(name)
    if factory is None:
        raise RelaydiffError(f"unknown device backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    return factory(**options)


def _as_id(text: str) -> str:
    """``text`` made into a protocol *id* (``[A-Za-z0-9][A-Za-z0-9._:-]*``, at most 128 bytes)."""
    clean = re.sub(r"[^A-Za-z0-9._:-]", "-", text).lstrip("._:-")[:128]
    return clean or "unnamed"


@register_backend("torch")
class TorchBackend:
    """The reference backend: the family's device variant in PyTorch, run with relaydiff.core.relay."""

    name = "torch"

    def __init__(self, *, family_dir: str | Path | None = None, variant: str | None = None, model: Any = None) -> None:
        """
        Args:
            family_dir: a family (or pipeline) folder; default: relaydiff's default family.
            variant: the family variant to load; default: the family's default device variant.
            model: an already loaded :class:`~relaydiff.core.family.LoadedModel` (then nothing is loaded).

        Raises:
            TypeError: both ``model`` and ``family_dir``/``variant`` were given.
            RelaydiffError / FamilyNotFoundError: the folder or variant does not exist.
        """
        from relaydiff.core import family

        if model is not None:
            if family_dir is not None or variant is not None:
                raise TypeError("TorchBackend takes either model= or family_dir=/variant=, not both")
        else:
            ref = family.resolve(family_dir if family_dir is not None else family.default_family_dir(), variant, role="device")
            model = family.load(ref)
        self.model = model
        self.family_id: str = model.family_id
        self.bundle_id = _as_id(f"{model.family_id}:{model.ref.variant}")
        # the torch backend has no exported bundle: identify the weights by family id and the device UNet config
        unet_config = (Path(model.ref.root) / model.ref.unet_subfolder / "config.json").read_bytes()
        self.bundle_sha256 = hashlib.sha256(self.bundle_id.encode() + b"\0" + unet_config).hexdigest()

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The family's noise-schedule config (which samplers fit it)."""
        return dict(self.model.scheduler_config)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        from relaydiff.core.relay import encode_prompt

        return encode_prompt(self.model, prompt, negative_prompt)

    def begin(self, request: RelayRequest) -> RelayState:
        from relaydiff.core.relay import start

        return start(self.model, replace(request, relay_step=0))

    def finish(self, state: RelayState) -> torch.Tensor:
        from relaydiff.core.relay import resume

        return resume(self.model, state).latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        from relaydiff.core.relay import decode

        return decode(self.model, latents)


# ---------------------------------------------------------------------------------------- bundle backends


class BundleBackend:
    """Runs a built bundle's ``unet_step`` and ``vae_decoder`` artifacts for one target and precision.

    The bundle is verified when loaded (manifest hash and schema, size and sha256 of every listed file,
    no unlisted files); each artifact is loaded into its runtime once. A relayed state is checked
    against the manifest (family id, latent shape, text-embedding shape, noise schedule, and the
    timestep grid when it uses the bundle's sampler and N), then steps [k, N) run through
    ``relay.resume`` with the artifact as the denoiser and the final latent goes through the artifact decoder.

    Device-only generation (``begin``/``encode_prompt``) needs a tokenizer and a text encoder: the bundle's own
    (``tokenizer/`` and its ``text_encoder`` artifact), so a bundle alone generates. A bundle without a
    ``text_encoder`` artifact takes the family's torch text encoder from the family folder (``family_dir``,
    else the folder recorded in the bundle when its config hash still matches); without one it finishes
    relays only, and ``begin`` raises. An artifact the build marked ``failed`` is refused by name.

    Safety (:mod:`relaydiff.runtime.safety`): ``safety_checker`` is the bundle's checker artifact for this target (its
    precision, else fp32), None when the manifest has no safety checker; ``denylist`` the bundle's entries.
    :class:`~relaydiff.runtime.device.DeviceRuntime` applies both.
    """

    TARGET = ""  # set by the registered subclasses
    RUNTIME = ""  # the runtime name announced to the host

    def __init__(
        self, *, bundle_dir: str | Path, precision: str = "fp32", family_dir: str | Path | None = None, threads: int = 1,
        trusted_key: str | Path | None = None,
    ) -> None:
        """
        Args:
            bundle_dir: a bundle folder written by ``relaydiff bundle build``.
            precision: which artifacts to run, "fp32" or "int8".
            family_dir: the bundle's family folder, for the tokenizer (and the text encoder when the bundle has none).
            threads: intra-op threads of onnxruntime (ExecuTorch uses its own pool).
            trusted_key: an Ed25519 public key PEM: the bundle must be signed by it (``manifest.sig``), else refused.

        Raises:
            BundleError: the folder is not a bundle, does not verify (the message names each bad file), lacks an
                ``unet_step`` or ``vae_decoder`` artifact for this target and precision, or ``family_dir`` is not its family.
            RuntimeUnavailableError: the target's runtime is not installed.
        """
        from relaydiff.core.denoiser import LatentSpec
        from relaydiff.core.relay import RelaySide
        from relaydiff.runtime.artifact_denoiser import ArtifactDenoiser
        from relaydiff.runtime.bundle import PRECISIONS, BundleError, find_family, open_session, verify

        if precision not in PRECISIONS:
            raise RelaydiffError(f"unknown precision {precision!r}; known precisions: {', '.join(PRECISIONS)}")
        root = Path(bundle_dir).resolve()
        if not root.is_dir():
            raise BundleError(f"bundle folder '{root}' does not exist")
        report = verify(root, parity=False, trusted_key=trusted_key)  # before anything is loaded: a tampered file is never run
        if not report.ok or report.manifest is None:
            raise BundleError(f"bundle '{root}' does not verify", report.problems)
        manifest = report.manifest
        self.root, self.manifest, self.precision = root, manifest, precision
        entries = manifest.artifacts_for(self.TARGET, precision)
        for need in ("unet_step", "vae_decoder"):
            if need not in entries:
                have = sorted({"/".join(a.key) for a in manifest.artifacts})
                raise BundleError(f"bundle '{root}' has no {self.TARGET}/{precision}/{need} artifact; it has: {', '.join(have)}")
        self.name = self.RUNTIME
        self.family_id: str = manifest.family.id
        self.bundle_id = _as_id(f"{self.family_id}:{self.TARGET}:{precision}")
        self.bundle_sha256 = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()  # commits to every artifact's sha256

        step = entries["unet_step"]
        self._unet = open_session(root, step, threads=threads)
        self._decoder = open_session(root, entries["vae_decoder"], threads=threads)
        self._lock = threading.Lock() if self.TARGET == "executorch" else None  # one ExecuTorch method is not re-entrant
        sample, text = step.input("sample"), step.input("text_embeds")
        student = manifest.relay.student
        self.distilled = step.input("guidance_scale") is None  # a student's unet_step: one conditional pass, guidance baked in
        if sample is None or text is None:
            raise BundleError(f"{step.file}: its inputs {[t.name for t in step.inputs]} lack 'sample' or 'text_embeds'")
        if self.distilled != (student is not None):
            raise BundleError(f"{step.file}: its inputs {sorted(t.name for t in step.inputs)} "
                              + ("take no guidance scale, but the manifest describes no student"
                                 if self.distilled else "take a guidance scale, but the manifest describes a distilled student"))
        self.latent_shape: tuple[int, ...] = sample.shape
        self.embeds_shape: tuple[int, ...] = (1, *text.shape[1:])  # (1, L, D)
        if self.latent_shape != manifest.latent.shape:
            raise BundleError(f"{step.file}: input 'sample' has shape {list(self.latent_shape)}; "
                              f"the manifest's latent shape is {list(manifest.latent.shape)}")
        image_h = manifest.latent.image_shape[2]
        scheduler_config = dict(manifest.scheduler.config)
        spec = LatentSpec.from_configs(
            {"in_channels": self.latent_shape[1], "sample_size": list(self.latent_shape[2:])},
            {"scaling_factor": manifest.latent.vae_scaling_factor, "shift_factor": manifest.latent.vae_shift_factor}, scheduler_config)
        denoiser = ArtifactDenoiser(self._guarded(self._unet), spec, self.embeds_shape[2], distilled=self.distilled)
        self.cache = self._device_cache(entries, threads)
        self.side = RelaySide(denoiser, scheduler_config, self.family_id, image_h // self.latent_shape[2],
                              None if student is None else student.spec, self.cache)
        text_entry = entries.get("text_encoder")
        needs_family = manifest.tokenizer is None or text_entry is None
        family = find_family(root, manifest, Path(family_dir) if family_dir is not None else None) \
            if needs_family or family_dir is not None else None
        self._tokenizer: Any = None
        self._text_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
        if family is not None or not needs_family:
            self._tokenizer, self._text_encoder = self._text_side(family, text_entry, threads)
        self.safety_checker, self.denylist = self._safety(threads)

    def _safety(self, threads: int) -> tuple[SafetyChecker | None, tuple[str, ...]]:
        """The bundle's safety checker (its artifact at this precision, else the fp32 one of this target) and denylist.

        Raises:
            BundleError: the manifest has a safety_checker section but no runnable checker for this target, or the
                preprocessing config is unusable.
        """
        import json

        from relaydiff.runtime.bundle import SAFETY_COMPONENT, BundleError, open_session
        from relaydiff.runtime.safety import ClipPreprocess, SafetyChecker, read_denylist

        denylist = read_denylist(self.root / self.manifest.denylist.file.file) if self.manifest.denylist is not None else ()
        section = self.manifest.safety_checker
        if section is None:
            return None, denylist
        entry = (self.manifest.artifacts_for(self.TARGET, self.precision).get(SAFETY_COMPONENT)
                 or self.manifest.artifacts_for(self.TARGET, "fp32").get(SAFETY_COMPONENT))
        if entry is None:
            raise BundleError(f"bundle '{self.root}' has a safety checker but no {self.TARGET} artifact of it (see the manifest's "
                              "skipped list); use a target it converted for")
        try:
            config = json.loads((self.root / section.preprocessor.file).read_text())  # a verified, listed file
            preprocess = ClipPreprocess.from_config(config if isinstance(config, dict) else {})
        except (OSError, ValueError, RelaydiffError) as exc:
            raise BundleError(f"{section.preprocessor.file}: unusable preprocessing config: {exc}") from None
        return SafetyChecker(self._guarded(open_session(self.root, entry, threads=threads)), preprocess, entry.name), denylist

    def _device_cache(self, entries: Mapping[str, ArtifactEntry], threads: int) -> DeviceCache | None:
        """The cached-step pair and the bundle's policy, when the bundle has them (a budgeted state is refused otherwise).

        Raises:
            BundleError: only one of the pair, or no cache section; RelaydiffError: a policy of another family.
        """
        from relaydiff.core.caching.device import DeviceCache
        from relaydiff.core.caching.policy import load_policy
        from relaydiff.runtime.artifact_denoiser import ArtifactCachedStep
        from relaydiff.runtime.bundle import CACHE_COMPONENTS, BundleError, open_session

        have = [c for c in CACHE_COMPONENTS if c in entries]
        if not have:
            return None
        section = self.manifest.cache
        if len(have) != len(CACHE_COMPONENTS) or section is None:
            raise BundleError(f"bundle '{self.root}' has {', '.join(have)} for {self.TARGET}/{self.precision} but "
                              + ("not the whole pair" if len(have) != len(CACHE_COMPONENTS) else "no manifest cache section"))
        full, cached = entries["unet_step_full"], entries["unet_step_cached"]
        deep = next((t for t in full.outputs if t.name == "deep_features"), None)
        if deep is None or cached.input("deep_features") != deep:
            raise BundleError(f"{full.file}: its deep_features output does not match {cached.file}'s deep_features input")
        step = ArtifactCachedStep(self._guarded(open_session(self.root, full, threads=threads)),
                                  self._guarded(open_session(self.root, cached, threads=threads)), deep.shape)
        if section.policy is None:
            return DeviceCache(step, section.mechanism)
        policy, config = load_policy(self.root / section.policy.file)
        if config.family_id != self.family_id:
            raise RelaydiffError(f"cache policy '{section.policy.file}' was trained for family {config.family_id!r}; "
                                 f"the bundle is for family {self.family_id!r}")
        if config.cache_branch != section.cache_branch:
            raise BundleError(f"cache policy '{section.policy.file}' splits at branch {config.cache_branch}; "
                              f"the bundle's graphs at {section.cache_branch}")
        return DeviceCache(step, config.mechanism, policy, config, section.policy.file)

    def _text_side(self, family: Path | None, entry: ArtifactEntry | None,
                   threads: int) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor]]:
        """(tokenizer, token ids -> embeddings): the bundle's tokenizer (else the family's), the bundle's text encoder
        (else the family's torch one)."""
        import transformers

        from relaydiff.core.family import read_json
        from relaydiff.runtime.bundle import BundleError, open_session

        index = read_json(family / "model_index.json") if family is not None else {}

        def cls(key: str, default: str) -> Any:  # the library class model_index.json names, as relaydiff.core.family.load reads it
            spec = index.get(key)
            return getattr(transformers, spec[1] if isinstance(spec, list) and len(spec) == 2 else default)

        packed = self.manifest.tokenizer
        if packed is not None:  # verified files (text only: vocab, merges, configs), loaded by the class the manifest names
            tok_cls = getattr(transformers, packed.tokenizer_class, None)
            if tok_cls is None or not packed.tokenizer_class.endswith(("Tokenizer", "TokenizerFast")):
                raise BundleError(f"the bundle's tokenizer class {packed.tokenizer_class!r} is not a transformers tokenizer")
            tokenizer = tok_cls.from_pretrained(str(self.root / packed.folder), local_files_only=True)
        else:
            assert family is not None
            tokenizer = cls("tokenizer", "CLIPTokenizer").from_pretrained(str(family), subfolder="tokenizer", local_files_only=True)
        if entry is not None:
            session = self._guarded(open_session(self.root, entry, threads=threads))

            def artifact(ids: torch.Tensor) -> torch.Tensor:
                out = session({"input_ids": ids.numpy().astype(np.int32)})["last_hidden_state"]
                return torch.from_numpy(np.ascontiguousarray(out))

            return tokenizer, artifact
        assert family is not None  # needs_family: no text_encoder artifact
        encoder = cls("text_encoder", "CLIPTextModel").from_pretrained(str(family), subfolder="text_encoder", local_files_only=True)
        encoder = encoder.eval().requires_grad_(False)
        return tokenizer, lambda ids: encoder(ids)[0]

    def _guarded(self, session: Callable[[Any], dict[str, np.ndarray]]) -> Callable[[Any], dict[str, np.ndarray]]:
        if self._lock is None:
            return session
        lock = self._lock

        def run(inputs: Any) -> dict[str, np.ndarray]:
            with lock:
                return session(inputs)

        return run

    # ------------------------------------------------------------------------------------------ Backend

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        """The bundle's noise-schedule config (which samplers fit it)."""
        return dict(self.side.scheduler_config)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        from relaydiff.core.relay import encode_texts

        if self._tokenizer is None or self._text_encoder is None:
            raise self._no_text("encode a prompt")
        return encode_texts(self._tokenizer, self._text_encoder, prompt, negative_prompt)

    def begin(self, request: RelayRequest) -> RelayState:
        from relaydiff.core.relay import start_from

        if self._tokenizer is None:
            raise self._no_text("generate on the device alone")
        embeds = self.encode_prompt(request.prompt, request.negative_prompt)
        state = start_from(self.side, replace(request, relay_step=0), embeds)  # step 0: no denoiser call
        self.check_state(state)
        return state

    def finish(self, state: RelayState) -> torch.Tensor:
        from relaydiff.core.relay import resume

        self.check_state(state)
        with torch.inference_mode():
            return resume(self.side, state).latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if tuple(latents.shape[1:]) != self.latent_shape[1:]:
            raise RelaydiffError(
                f"latent of shape {list(latents.shape)} does not fit the bundle's decoder (latent {list(self.latent_shape)})"
            )
        images = [self._guarded(self._decoder)({"latent": z[None].float().numpy()})["image"][0] for z in latents]
        image = np.clip(np.stack(images), 0.0, 1.0)  # the artifact bakes in scaling and (x / 2 + 0.5).clamp(0, 1)
        return (image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)

    def probe_state(self, request: RelayRequest) -> RelayState:
        """A step-0 state for timing the denoiser (DeviceRuntime.steps_per_second): the prompt encoded when the
        backend can, else zero text embeddings of the bundle's shape (a bundle without a family still announces a speed)."""
        if self._tokenizer is not None:
            return self.begin(request)
        from relaydiff.core.relay import start_from

        zeros = torch.zeros(self.embeds_shape)
        return start_from(self.side, replace(request, relay_step=0), (zeros, zeros))

    # ------------------------------------------------------------------------------------------ checks

    def check_state(self, state: RelayState) -> None:
        """Refuse a (validated) state the bundle cannot continue: first the compatibility check every consumer runs
        (:func:`relaydiff.core.family.check_state`: family id, noise schedule, channels, embedding width, every
        mismatch), then what the bundle's fixed-shape artifacts need.

        Raises:
            CompatibilityError: another family or noise schedule.
            RelaydiffError: batch, latent or text-embedding shape, or timestep grid the artifacts cannot take.
        """
        from relaydiff.core.errors import RelayStateError
        from relaydiff.core.family import check_state

        misfit: RelayStateError | None = None
        try:
            check_state(self.side, state)
        except RelayStateError as exc:  # same family, a latent that does not fit: the artifact's shapes say it more exactly
            misfit = exc
        if tuple(state.latents.shape) != self.latent_shape:
            raise RelaydiffError(
                f"relay latent has shape {list(state.latents.shape)}; the bundle's unet_step takes {list(self.latent_shape)}"
            )
        for name, t in (("prompt", state.prompt_embeds), ("negative prompt", state.negative_prompt_embeds)):
            if t is not None and tuple(t.shape) != self.embeds_shape:
                raise RelaydiffError(
                    f"relay {name} embeddings have shape {list(t.shape)}; the bundle's unet_step takes {list(self.embeds_shape)}"
                )
        sched = self.manifest.scheduler
        same_grid = (state.sampler, state.num_inference_steps) == (sched.sampler, sched.steps)
        if same_grid and tuple(state.timesteps.tolist()) != sched.timesteps:
            raise RelaydiffError(f"relay timestep grid {state.timesteps.tolist()} differs from the bundle's {list(sched.timesteps)}")
        if misfit is not None:
            raise misfit

    def _no_text(self, what: str) -> RelaydiffError:
        return RelaydiffError(
            f"cannot {what}: bundle '{self.root}' carries no text encoder (or no tokenizer) and its family folder was not found; pass "
            f"family_dir= (--family) with family {self.family_id} to generate without a host"
        )


@register_backend("onnx")
class OnnxBundleBackend(BundleBackend):
    """A bundle's ONNX artifacts in onnxruntime (CPU execution provider)."""

    TARGET = "onnx"
    RUNTIME = "onnxruntime"


@register_backend("executorch")
class ExecuTorchBundleBackend(BundleBackend):
    """A bundle's ExecuTorch ``.pte`` artifacts in ExecuTorch's Python runtime (XNNPACK)."""

    TARGET = "executorch"
    RUNTIME = "executorch"
