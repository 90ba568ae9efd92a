"""On-device safety (issue 20 item 7): the family's safety checker as a bundle component, the prompt denylist, and the
runtime applying both before it returns an image (runtime.safety)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from relaydiff.core.relay import RelayRequest
from relaydiff.runtime.safety import (
    PromptDeniedError, SafetyReport, check_prompt, clip_input, denied_entry, flagged, parse_denylist, screen,
)

RELAY = {"relay_step": 3, "steps": 10}


@pytest.fixture(scope="module")
def safe_bundle(safe_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from relaydiff.export.bundle import BundleConfig, build

    torch.set_num_threads(1)
    deny = tmp_path_factory.mktemp("deny") / "denylist.txt"
    deny.write_text("# words the app refuses\nForbidden\nred dragon\n")
    out = tmp_path_factory.mktemp("safe-bundle") / "bundle"
    build(BundleConfig(family=safe_family, out=out, targets=("onnx",), precisions=("fp32",), calibration_prompts=2,
                       eval_prompts=1, zip=False, denylist=deny, **RELAY), progress=False)
    return out


def test_denylist_matches_whole_words_case_insensitively() -> None:
    entries = parse_denylist("# comment\n  Gore \n\nred   dragon # a phrase\ngore\n")
    assert entries == ("gore", "red dragon")
    assert denied_entry("Some GORE here", entries) == "gore"
    assert denied_entry("a red, dragon!", entries) == "red dragon"  # punctuation is not a word
    assert denied_entry("gorey red dragonfly", entries) is None  # whole words only
    with pytest.raises(PromptDeniedError, match="prompt refused: it contains 'gore'") as info:
        check_prompt("gore", entries, "the test list")
    assert info.value.entry == "gore"


def test_screen_blacks_out_a_flagged_image_and_reports_it() -> None:
    image = np.full((8, 8, 3), 200, np.uint8)
    assert screen(image, None) == (image, SafetyReport(False))
    out, report = screen(image, lambda _im: True)
    assert report.to_json() == {"checked": True, "nsfw": True, "denied_prompt": False} and not out.any()
    out, report = screen(image, lambda _im: False)
    assert report == SafetyReport(True) and out is image
    assert flagged(np.array([[-0.5, 0.001]])) and not flagged(np.array([[-0.5, 0.0]])) and flagged(np.array([[np.nan]]))


def test_clip_input_matches_the_feature_extractor(safe_family: Path) -> None:
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ref = CLIPImageProcessor.from_pretrained(str(safe_family / "feature_extractor"))(images=image, return_tensors="np")["pixel_values"]
    config = json.loads((safe_family / "feature_extractor" / "preprocessor_config.json").read_text())
    got = clip_input(image, config)
    assert got.shape == ref.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_the_exported_checker_matches_torch_and_the_manifest_records_it(safe_bundle: Path, safe_family: Path) -> None:
    from relaydiff.export.components import load_safety_checker
    from relaydiff.runtime.bundle import load_fixture
    from relaydiff.runtime.manifest import Manifest
    from relaydiff.runtime.sessions import ArtifactSession

    m = Manifest.read(safe_bundle)
    assert m.safety_checker is not None and m.safety_checker.concepts == 17 and m.safety_checker.special_concepts == 3
    assert m.denylist is not None and m.denylist.entries == 2
    art = m.artifacts_for("onnx", "fp32")["safety_checker"]
    assert art.status == "passed" and art.parity["passed"]
    inputs, ref = load_fixture(safe_bundle, m, "safety_checker")
    # the stored reference is diffusers' own forward_onnx arithmetic on the torch checker
    import torch

    checker = load_safety_checker(safe_family)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(torch.from_numpy(inputs["clip_input"]))[1]))
        cos = emb @ torch.nn.functional.normalize(checker.concept_embeds).t()
    np.testing.assert_allclose(ref["concept_scores"], (cos - checker.concept_embeds_weights).numpy(), atol=1e-5)
    got = ArtifactSession(safe_bundle / art.file, "onnx", ["clip_input"], ["concept_scores", "special_scores"])(inputs)
    assert np.abs(got["concept_scores"] - ref["concept_scores"]).max() < 1e-4
    assert np.abs(got["special_scores"] - ref["special_scores"]).max() < 1e-4


def test_the_runtime_applies_checker_and_denylist(safe_bundle: Path, tmp_path: Path) -> None:
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.device import DeviceRuntime

    user = tmp_path / "mine.txt"
    user.write_text("castle\n")
    runtime = DeviceRuntime(create_backend("onnx", bundle_dir=safe_bundle), denylist=user)
    out = runtime.generate(RelayRequest("a blue square", relay_step=0, steps=RELAY["steps"], seed=1))
    assert out.safety.to_json() == {"checked": True, "nsfw": True, "denied_prompt": False}  # this checker flags everything
    assert not out.image.any() and "safety_s" in out.timings
    with pytest.raises(PromptDeniedError, match="'forbidden'"):  # the bundle's list
        runtime.generate(RelayRequest("a FORBIDDEN circle", relay_step=0, steps=RELAY["steps"]))
    with pytest.raises(PromptDeniedError, match="'castle'"):  # the user's list
        runtime.generate(RelayRequest("a castle", relay_step=0, steps=RELAY["steps"]))


def test_a_family_without_a_checker_says_so(bundle: Path) -> None:
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.device import DeviceRuntime

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["safety_checker"] is None and manifest["denylist"] is None
    out = DeviceRuntime(create_backend("onnx", bundle_dir=bundle)).generate(RelayRequest("a red circle", relay_step=0, steps=10))
    assert out.safety.to_json() == {"checked": False, "nsfw": False, "denied_prompt": False} and out.image.any()


def test_the_client_refuses_a_denied_prompt_before_it_sends_anything(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.device import DeviceRuntime

    runtime = DeviceRuntime(create_backend("torch", model=tiny_pair[1]), denylist=["Castle"])
    client = DeviceClient(runtime, "ws://127.0.0.1:9/", auth_token="t")  # nothing listens: a request sent would fall back
    with pytest.raises(PromptDeniedError, match="prompt refused: it contains 'castle'"):
        asyncio.run(client.generate("a CASTLE at night"))
    assert runtime.screen(np.ones((4, 4, 3), np.uint8))[1].to_json() == {"checked": False, "nsfw": False, "denied_prompt": False}
