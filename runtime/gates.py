"""The conformance bars of a bundle artifact, defined once: applied by ``bundle build``, re-checked by ``bundle verify``,
refused by the runtime when failed, and imported by ``device_tests``.

Every artifact gets the gates that apply to it (:func:`gate_names`):

| gate | what is measured | bar |
| --- | --- | --- |
| ``per_call`` | the artifact on its parity fixture (a held-out relay's first device step, or its final latent / prompt) against torch fp32 | the artifact's tolerance: fp32 max abs error <= ``FP32_MAX_ABS``; INT8 its PSNR floor (``quantize.onnx_int8.INT8_TOLERANCES``) |
| ``relay_image_psnr_db`` | ``unet_step`` (ONNX, ExecuTorch): the whole device half [k, N) of held-out relays on the artifact, with the same target/precision decoder when the bundle has one, against the torch fp32 device half | worst final image PSNR >= ``RELAY_IMAGE_PSNR_DB[precision]`` |
| ``prompt_accuracy_points`` | INT8 ``unet_step`` (ONNX, ExecuTorch) on a trained family: prompt accuracy of the relayed images against fp32 torch, same hand-offs | abs(difference) <= ``ACCURACY_POINTS`` percentage points |

A gate that could not run here (CoreML off macOS, a random-weight family for accuracy) has ``measured = None`` and a note;
it neither passes nor fails. An artifact is ``failed`` when any gate fails, ``passed`` when at least one passed and
none failed, else ``unmeasured``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FP32_MAX_ABS = 1e-3  # fp32 artifacts: the per-call error against torch fp32 (every output element)
RELAY_IMAGE_PSNR_DB = {"fp32": 50.0, "int8": 30.0}  # final relayed image; fp32: 1e-5 per-step errors must stay invisible
ACCURACY_POINTS = 2.0  # |INT8 prompt accuracy - fp32 accuracy|, percentage points
ACCURACY_PROMPTS = 100  # relaydiff.evaluate.eval_prompts(n, seed 0): even over 1-3 objects

STATUSES = ("passed", "failed", "unmeasured")
GATES = ("per_call", "relay_image_psnr_db", "prompt_accuracy_points")
RELAY_TARGETS = ("onnx", "executorch")  # the targets whose runtime runs here, so a whole relay can be measured


@dataclass(frozen=True)
class Gate:
    """One bar an artifact is held to, and what was measured against it (None: not measured here, see ``note``)."""

    name: str  # one of GATES
    op: str  # "<=" or ">=": measured op bar passes
    bar: float
    measured: float | None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether ``measured`` meets the bar (None when nothing was measured)."""
        if self.measured is None:
            return None
        if not math.isfinite(self.measured):
            return False
        return self.measured <= self.bar if self.op == "<=" else self.measured >= self.bar

    def describe(self) -> str:
        got = "not measured" if self.measured is None else f"{self.measured:.4g}"
        verdict = {True: "ok", False: "FAILED", None: "not run"}[self.passed]
        return f"{self.name}: {got} (bar {self.op} {self.bar:g}) {verdict}" + (f"; {self.note}" if self.note else "")

    def to_json(self) -> dict[str, Any]:
        measured = None if self.measured is None else (round(self.measured, 7) if math.isfinite(self.measured) else None)
        data: dict[str, Any] = {"name": self.name, "op": self.op, "bar": self.bar, "measured": measured, "passed": self.passed}
        if self.measured is not None and not math.isfinite(self.measured):  # JSON has no NaN/inf: record the failure in words
            data["passed"], data["note"] = False, (self.note + "; " if self.note else "") + f"measured {self.measured}"
        elif self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Gate:
        measured = data.get("measured")
        if measured is None and data.get("passed") is False:  # a non-finite measurement, written as null
            measured = math.inf if data["op"] == "<=" else -math.inf
        return cls(data["name"], data["op"], float(data["bar"]), None if measured is None else float(measured), data.get("note", ""))


def status_of(gates: Iterable[Gate]) -> str:
    """'failed' if any gate failed, 'passed' if one passed and none failed, else 'unmeasured'."""
    verdicts = [g.passed for g in gates]
    if False in verdicts:
        return "failed"
    return "passed" if True in verdicts else "unmeasured"


def gate_names(target: str, precision: str, component: str) -> tuple[str, ...]:
    """The gates an artifact of (target, precision, component) is held to."""
    names = ["per_call"]
    if component == "unet_step" and target in RELAY_TARGETS:
        names.append("relay_image_psnr_db")
        if precision == "int8":
            names.append("prompt_accuracy_points")
    return tuple(names)


def per_call_gate(precision: str, tolerance: Any, parity: Mapping[str, Any]) -> Gate:
    """The fixture run (``runtime.bundle.fixture_parity`` figures, or ``{"run": False, "reason": ...}``) against the
    artifact's tolerance: the worst output's max abs error (fp32, or an INT8 tolerance with max_abs) or PSNR."""
    use_abs = precision == "fp32" or tolerance.min_psnr_db is None
    op, bar = ("<=", FP32_MAX_ABS if precision == "fp32" else float(tolerance.max_abs)) if use_abs else (">=", float(tolerance.min_psnr_db))
    if not parity.get("run", False):
        return Gate("per_call", op, bar, None, str(parity.get("reason", "not run")))
    figures = [v for v in parity.values() if isinstance(v, Mapping)]
    key = "max_abs" if use_abs else "psnr_db"
    values = [math.inf if f.get(key) is None else float(f[key]) for f in figures] if use_abs else \
        [-math.inf if f.get(key) is None else float(f[key]) for f in figures]
    if not values:
        return Gate("per_call", op, bar, None, "the fixture run gave no outputs")
    return Gate("per_call", op, bar, max(values) if use_abs else min(values), "on the bundle's parity fixture")


def relay_gate(precision: str, image_psnr_db: float | None, note: str) -> Gate:
    return Gate("relay_image_psnr_db", ">=", RELAY_IMAGE_PSNR_DB[precision], image_psnr_db, note)


def accuracy_gate(reference: float | None, got: float | None, prompts: int, note: str = "") -> Gate:
    """|got - reference| in points (None when either was not measured)."""
    if reference is None or got is None:
        return Gate("prompt_accuracy_points", "<=", ACCURACY_POINTS, None, note)
    detail = f"{got:.1f}% vs fp32 torch {reference:.1f}% over {prompts} prompts"
    return Gate("prompt_accuracy_points", "<=", ACCURACY_POINTS, abs(got - reference), f"{detail}; {note}" if note else detail)


def recheck(gates: Sequence[Gate]) -> list[str]:
    """Problems with recorded gates under this relaydiff's bars: a bar that differs from the one defined here."""
    bars = {"relay_image_psnr_db": set(RELAY_IMAGE_PSNR_DB.values()), "prompt_accuracy_points": {ACCURACY_POINTS}}
    out = []
    for g in gates:
        if g.name in bars and g.bar not in bars[g.name]:
            out.append(f"gate {g.name}: recorded bar {g.bar:g} is not this relaydiff's ({', '.join(f'{b:g}' for b in sorted(bars[g.name]))})")
    return out
