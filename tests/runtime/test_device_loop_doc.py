"""docs/device_loop.md's reference implementation (numpy + onnxruntime, from the manifest alone), extracted from the
doc and run against relaydiff's torch device half on the session's tiny bundle.

Tolerances (stated in the doc): fp32 artifacts, final latent within 1e-4 max abs and the uint8 image within 1 level
of torch fp32; INT8 artifacts, image PSNR >= 30 dB (the bundle gate's bar).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "device_loop.md"
MARK = "<!-- device-loop-reference -->"


def reference_code() -> str:
    """The python block that follows the marker in docs/device_loop.md."""
    text = DOC.read_text()
    assert MARK in text, f"{DOC.name} lost its {MARK} marker"
    found = re.search(r"```python\n(.*?)```", text[text.index(MARK):], re.S)
    assert found is not None, "no python block after the marker"
    return found.group(1)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    code = reference_code()
    imported = set(re.findall(r"^(?:import|from) (\w+)", code, re.M))
    assert imported <= {"json", "struct", "pathlib", "numpy", "onnxruntime"}, imported  # dependency-free, as the doc says
    assert len(code.splitlines()) <= 70
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # our own doc's code, not data from a bundle or the wire
    return namespace


def test_the_doc_loop_finishes_a_relay_like_torch(reference: dict[str, Any], bundle: Path, handoff) -> None:  # type: ignore[no-untyped-def]
    state, ref_latents, ref_images = handoff
    ref_image = ref_images[0]  # (H, W, 3) uint8
    latent, image = reference["finish"](str(bundle), state.to_bytes(), "fp32")
    ref = ref_latents.float().numpy()
    assert latent.shape == ref.shape and float(np.abs(latent - ref).max()) <= 1e-4, float(np.abs(latent - ref).max())
    assert image.shape == ref_image.shape and int(np.abs(image.astype(int) - ref_image.astype(int)).max()) <= 1


def test_the_doc_loop_runs_the_int8_artifacts_within_the_gate(reference: dict[str, Any], bundle: Path, handoff) -> None:  # type: ignore[no-untyped-def]
    from relaydiff.core.metrics import image_psnr
    from relaydiff.runtime.gates import RELAY_IMAGE_PSNR_DB

    state, _latents, ref_images = handoff
    ref_image = ref_images[0]
    _latent, image = reference["finish"](str(bundle), state.to_bytes(), "int8")
    got = image_psnr(image, ref_image, peak=255.0)
    assert got >= RELAY_IMAGE_PSNR_DB["int8"], got


def test_the_doc_loop_refuses_a_hand_off_its_table_does_not_cover(reference: dict[str, Any], bundle: Path, handoff) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    state = handoff[0]
    other = dataclasses.replace(state, timesteps=state.timesteps + 1)  # another grid of the same length
    with pytest.raises(ValueError, match="timestep grid"):
        reference["finish"](str(bundle), other.to_bytes(), "fp32")
