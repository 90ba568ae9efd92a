"""On-device safety: the bundle's image safety checker and a prompt denylist, applied before an image is returned.

Offline generation bypasses server-side filters, so a bundle can carry both checks (docs/bundle.md, "Safety"):

- **the safety checker**: the family's diffusers ``StableDiffusionSafetyChecker`` (a ``safety_checker/`` and a
  ``feature_extractor/`` folder in the pipeline folder), exported as the bundle component ``safety_checker``. Its
  graph takes ``clip_input`` (the CLIP pixel values of the image, made by :func:`clip_input` from the bundle's
  ``feature_extractor/preprocessor_config.json``) and returns ``concept_scores`` and ``special_scores`` as diffusers'
  ``forward_onnx`` computes them (cosine distance minus the per-concept threshold, +0.01 on every concept score when a
  special-care score is positive). An image is flagged when any concept score is > 0; a flagged image is replaced by
  a black one, as diffusers does.
- **the prompt denylist**: a plain text file, one word or phrase a line (``#`` starts a comment), from the bundle
  (``safety/denylist.txt``, ``bundle build --denylist FILE``) and/or the user (``DeviceRuntime(denylist=...)``). A prompt
  is refused when an entry occurs in it as whole words, case-insensitively (``"Gore"`` matches ``"gore"`` and
  ``"some gore here"``, not ``"gorey"``): :class:`PromptDeniedError` names the entry.

Every image the device runtime returns says what was checked: ``{"checked": bool, "nsfw": bool, "denied_prompt": bool}``
(``checked``: a safety checker ran on it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError

DENYLIST_FILE = "safety/denylist.txt"  # where a bundle keeps its denylist
MAX_DENYLIST_BYTES = 1 << 20  # a denylist file is at most 1 MiB ...
MAX_DENYLIST_ENTRIES = 10_000  # ... of at most this many entries ...
MAX_ENTRY_CHARS = 100  # ... of at most this many characters
MAX_PROMPT_CHARS = 10_000  # a longer prompt is matched on its first characters only (bounded work)
MAX_CLIP_SIZE = 1024  # the largest clip_input side a preprocessor config may ask for


class PromptDeniedError(RelaydiffError):
    """A prompt matched the denylist: nothing was generated."""

    def __init__(self, message: str, entry: str) -> None:
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class SafetyReport:
    """What the runtime checked on one image."""

    checked: bool  # a safety checker ran on the image
    nsfw: bool = False  # it flagged the image (which was then replaced by a black one)
    denied_prompt: bool = False  # the prompt matched the denylist (the runtime refuses such a prompt; always False on an image)

    def to_json(self) -> dict[str, bool]:
        return {"checked": self.checked, "nsfw": self.nsfw, "denied_prompt": self.denied_prompt}


UNCHECKED = SafetyReport(False)


# -------------------------------------------------------------------------------------------------- denylist


def parse_denylist(text: str, *, where: str = "denylist") -> tuple[str, ...]:
    """The entries of a denylist's text: one a line, stripped, lower-cased, ``#`` comments and blank lines dropped.

    Raises:
        RelaydiffError: too many entries, or an entry longer than MAX_ENTRY_CHARS (naming the line).
    """
    entries: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = " ".join(line.split("#", 1)[0].split()).lower()
        if not entry:
            continue
        if len(entry) > MAX_ENTRY_CHARS:
            raise RelaydiffError(f"{where}, line {n}: entry of {len(entry)} characters; expected at most {MAX_ENTRY_CHARS}")
        entries.append(entry)
        if len(entries) > MAX_DENYLIST_ENTRIES:
            raise RelaydiffError(f"{where}: more than {MAX_DENYLIST_ENTRIES} entries")
    return tuple(dict.fromkeys(entries))


def read_denylist(path: str | Path) -> tuple[str, ...]:
    """The entries of a denylist file (UTF-8 text, at most MAX_DENYLIST_BYTES).

    Raises:
        RelaydiffError: missing, too large, not UTF-8 text, or a bad entry (naming the file).
    """
    p = Path(path)
    if not p.is_file():
        raise RelaydiffError(f"denylist '{p}' is not a file; expected a text file with one word or phrase a line")
    if p.stat().st_size > MAX_DENYLIST_BYTES:
        raise RelaydiffError(f"denylist '{p}' is {p.stat().st_size} bytes; expected at most {MAX_DENYLIST_BYTES}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RelaydiffError(f"denylist '{p}' is not UTF-8 text: {exc}") from None
    return parse_denylist(text, where=f"denylist '{p}'")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def denied_entry(prompt: str, denylist: Iterable[str]) -> str | None:
    """The first denylist entry found in ``prompt`` as whole words (case-insensitive), else None."""
    words = _words(prompt[:MAX_PROMPT_CHARS])
    if not words:
        return None
    joined = " " + " ".join(words) + " "
    for entry in denylist:
        tokens = _words(entry)
        if tokens and " " + " ".join(tokens) + " " in joined:
            return entry
    return None


def check_prompt(prompt: str, denylist: Sequence[str], source: str = "the denylist") -> None:
    """Refuse ``prompt`` when a denylist entry occurs in it.

    Raises:
        PromptDeniedError: naming the entry and where the list came from.
    """
    entry = denied_entry(prompt, denylist)
    if entry is not None:
        raise PromptDeniedError(f"prompt refused: it contains {entry!r}, an entry of {source} (case-insensitive whole-word "
                                "match); nothing was generated", entry)


# ---------------------------------------------------------------------------------------------- the checker


def _size(value: Any, key: str) -> tuple[int, int]:
    """(height, width) of a CLIPImageProcessor size/crop_size entry (an int, or a dict with height/width or shortest_edge)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            s = value["shortest_edge"]
            return s, s
        if "height" in value and "width" in value:
            return value["height"], value["width"]
    raise RelaydiffError(f"preprocessor config {key} {value!r}: expected an int or {{'height', 'width'}} or {{'shortest_edge'}}")


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's steps for the safety checker: resize the shortest edge (PIL, bicubic), center crop,
    rescale to [0, 1], normalize by the CLIP mean and std; channels first."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL resample filter (3: bicubic, CLIP's)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClipPreprocess:
        """From a ``preprocessor_config.json`` (CLIPImageProcessor / CLIPFeatureExtractor).

        Raises:
            RelaydiffError: missing or out-of-range sizes, or a mean/std that is not three positive numbers.
        """
        short = _size(config.get("size", 224), "size")[0]
        crop = _size(config.get("crop_size", short), "crop_size")
        mean, std = config.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), config.get("image_std", (0.26862954, 0.26130258, 0.27577711))
        for name, v in (("size", short), ("crop height", crop[0]), ("crop width", crop[1])):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_CLIP_SIZE:
                raise RelaydiffError(f"preprocessor config {name} {v!r}: expected an integer in [1, {MAX_CLIP_SIZE}]")
        for name, v in (("image_mean", mean), ("image_std", std)):
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise RelaydiffError(f"preprocessor config {name} {v!r}: expected three numbers")
        if any(x <= 0 for x in std):
            raise RelaydiffError(f"preprocessor config image_std {std!r}: expected positive numbers")
        resample = config.get("resample", 3)
        return cls(short, (int(crop[0]), int(crop[1])), tuple(float(x) for x in mean), tuple(float(x) for x in std),  # type: ignore[arg-type]
                   int(resample) if isinstance(resample, int) and 0 <= resample <= 5 else 3)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``clip_input`` (1, 3, crop h, crop w) float32 of an (H, W, 3) uint8 image."""
        from PIL import Image

        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RelaydiffError(f"expected an (H, W, 3) uint8 image, got {image.dtype} of shape {image.shape}")
        h, w = image.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.shortest_edge * long / short)  # as transformers' get_resize_output_image_size rounds
        size = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)  # PIL: (width, height)
        pil = Image.fromarray(image).resize(size, resample=Image.Resampling(self.resample))
        ch, cw = self.crop
        left, top = (size[0] - cw) // 2, (size[1] - ch) // 2
        pil = pil.crop((left, top, left + cw, top + ch))  # PIL pads with black where the crop is larger
        x = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
        y = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(y.transpose(2, 0, 1)[None], dtype=np.float32)


def clip_input(image: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """``clip_input`` of an (H, W, 3) uint8 image per a ``preprocessor_config.json`` (see :class:`ClipPreprocess`)."""
    return ClipPreprocess.from_config(config)(image)


def flagged(concept_scores: np.ndarray) -> bool:
    """diffusers' rule: an image is NSFW when any concept score (special-care adjustment included) is > 0."""
    scores = np.asarray(concept_scores, dtype=np.float64)
    return bool(np.any(scores > 0) or not np.all(np.isfinite(scores)))  # a NaN score is not a pass


class SafetyChecker:
    """The bundle's exported checker: (H, W, 3) uint8 image -> flagged or not (a session runs the graph)."""

    def __init__(self, session: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], preprocess: ClipPreprocess,
                 name: str = "safety_checker") -> None:
        self.session = session
        self.preprocess = preprocess
        self.name = name  # the artifact that runs, for logs

    def scores(self, image: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session({"clip_input": self.preprocess(image)})
        return {k: np.asarray(v) for k, v in out.items()}

    def __call__(self, image: np.ndarray) -> bool:
        return flagged(self.scores(image)["concept_scores"])


def screen(image: np.ndarray, checker: Callable[[np.ndarray], bool] | None) -> tuple[np.ndarray, SafetyReport]:
    """(the image to return, what was checked): a flagged image is replaced by a black one of the same shape."""
    if checker is None:
        return image, UNCHECKED
    if checker(image):
        return np.zeros_like(image), SafetyReport(True, nsfw=True)
    return image, SafetyReport(True)
