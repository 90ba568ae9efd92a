"""CoreML: ML Programs for iOS17 and iOS18 whose spec is checked anywhere; runtime parity only on macOS."""

from __future__ import annotations

from typing import Any

import pytest

from relaydiff.export import RuntimeUnavailableError, get_exporter
from relaydiff.export.coreml import CoreMLExporter

NO_RUNTIME = CoreMLExporter().runtime_unavailable_reason()


@pytest.mark.parametrize(
    ("name", "target"), [("unet_step", "iOS18"), ("vae_decoder", "iOS17"), ("vae_decoder", "iOS18"), ("text_encoder", "iOS18")]
)
def test_coreml_spec_matches_the_declaration(exported: Any, name: str, target: str) -> None:
    artifact = exported("coreml", name, target=target)
    exporter = get_exporter("coreml", target=target)
    exporter.check_spec(artifact)  # names, shapes, dtypes, spec version, ML Program, metadata
    assert artifact.path.name == f"{name}.{target.lower()}.mlpackage"
    assert artifact.precision == "fp16" and artifact.tolerance.min_psnr_db == 35.0


@pytest.mark.parametrize("name", ["unet_step", "vae_decoder"])
def test_iOS18_uses_fused_attention(exported: Any, name: str) -> None:
    ops = get_exporter("coreml", target="iOS18").fused_attention_ops(exported("coreml", name, target="iOS18"))
    assert ops > 0 and exported("coreml", name, target="iOS18").metadata["fused_attention_ops"] == ops


def test_iOS17_has_no_fused_attention(exported: Any) -> None:
    artifact = exported("coreml", "vae_decoder", target="iOS17")
    assert get_exporter("coreml", target="iOS17").fused_attention_ops(artifact) == 0
    assert artifact.metadata["softmax_ops"] > 0  # attention decomposed into matmul + softmax


def test_text_encoder_attention_is_decomposed_even_on_iOS18(exported: Any) -> None:
    # transformers' CLIP passes an explicit scale to SDPA; coremltools only fuses scale-free SDPA calls
    assert exported("coreml", "text_encoder", target="iOS18").metadata["fused_attention_ops"] == 0


def test_coreml_spec_check_fails_for_the_wrong_target(exported: Any) -> None:
    from relaydiff.export import ValidationError

    artifact = exported("coreml", "text_encoder", target="iOS18")
    with pytest.raises(ValidationError, match="specification version 8"):
        get_exporter("coreml", target="iOS17").check_spec(artifact)


@pytest.mark.skipif(NO_RUNTIME is None, reason="this machine has a CoreML runtime")
def test_run_off_macos_raises_a_clear_error(exported: Any, device_model: Any) -> None:
    artifact = exported("coreml", "text_encoder", target="iOS18")
    exporter = get_exporter("coreml")
    with pytest.raises(RuntimeUnavailableError, match="requires macOS"):
        exporter.run(artifact, {})
    with pytest.raises(RuntimeUnavailableError, match="requires macOS"):
        exporter.validate(artifact, device_model)


@pytest.mark.skipif(NO_RUNTIME is not None, reason=NO_RUNTIME or "")
@pytest.mark.parametrize("target", ["iOS17", "iOS18"])
@pytest.mark.parametrize("name", ["unet_step", "vae_decoder", "text_encoder"])
def test_coreml_runtime_parity(exported: Any, device_model: Any, name: str, target: str) -> None:
    artifact = exported("coreml", name, target=target)
    report = get_exporter("coreml", target=target).validate(artifact, device_model)
    print(report)
