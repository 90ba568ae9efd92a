"""FixedPolicy's choice of k and the ledger's exactly-once bookkeeping."""

from __future__ import annotations

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.ledger import Ledger, Source, digest_bytes, digest_latents
from relaydiff.host.policy import FixedPolicy, Policy
from relaydiff.link.events import Feedback, GenerateRequest


def request(quality: float) -> GenerateRequest:
    return GenerateRequest("r1", "a red circle", quality, 10.0)


@pytest.mark.parametrize("quality, k", [(0.0, 5), (0.5, 12), (1.0, 20)])
def test_fixed_policy_reads_k_off_the_quality_preference(quality: float, k: int) -> None:
    assert FixedPolicy().choose(request(quality), None, 25) == k  # f = 0.2 + q * 0.6


@pytest.mark.parametrize("fraction, k", [(0.0, 0), (0.3, 8), (1.0, 25)])
def test_fixed_policy_with_a_fixed_fraction_ignores_the_preference(fraction: float, k: int) -> None:
    policy = FixedPolicy(fraction)
    assert policy.choose(request(0.0), None, 25) == policy.choose(request(1.0), None, 25) == k
    assert isinstance(policy, Policy)
    assert policy.observe(request(0.5), k, Feedback("r1", 1.0, 0.5)) is None


def test_ledger_records_one_result_per_request_and_refuses_a_second() -> None:
    import torch

    ledger = Ledger()
    ledger.accept("s1/a", "x")
    ledger.accept("s1/b", "y")
    assert [e.key for e in ledger.pending()] == ["s1/a", "s1/b"]
    latents = torch.ones(1, 4, 2, 2)
    assert ledger.complete("s1/a", Source.HOST_FALLBACK, latents=latents)
    assert not ledger.complete("s1/a", Source.DEVICE, png=b"late")
    entry = ledger.get("s1/a")
    assert entry.source is Source.HOST_FALLBACK and entry.result_kind == "latent" and entry.result_bytes == 64
    assert entry.result_sha256 == digest_latents(latents) != digest_latents(latents.half())
    assert ledger.refused == [("s1/a", Source.DEVICE)] and ledger.refused_count == 1
    assert [e.key for e in ledger.pending()] == ["s1/b"] and len(ledger) == 2


def test_ledger_keeps_digests_only_and_is_bounded_in_size_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    ledger = Ledger(max_entries=3, max_age_s=60.0)
    blob = b"\x89PNG" + bytes(1 << 20)
    for i in range(10):
        ledger.accept(f"s1/{i}", "p" * 5000)
        ledger.complete(f"s1/{i}", Source.DEVICE, png=blob, timings={"host_s": 1.0})
    ledger.accept("s1/pending", "x")  # pending entries are never dropped
    assert [e.key for e in ledger.entries()] == ["s1/7", "s1/8", "s1/9", "s1/pending"] and ledger.forgotten == 7
    entry = ledger.get("s1/9")
    assert entry.result_sha256 == digest_bytes(blob) and entry.result_bytes == len(blob) and len(entry.prompt) == 256
    assert not any(isinstance(v, bytes) for v in vars(entry).values())  # no blob kept
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 61.0)
    ledger.prune()
    assert [e.key for e in ledger.entries()] == ["s1/pending"] and ledger.find("s1/9") is None


def test_ledger_refuses_unknown_and_reused_keys() -> None:
    ledger = Ledger()
    ledger.accept("s1/a", "x")
    with pytest.raises(RelaydiffError, match="'s1/a' is already in the ledger"):
        ledger.accept("s1/a", "x")
    with pytest.raises(RelaydiffError, match="'s1/zz' was never accepted"):
        ledger.complete("s1/zz", Source.DEVICE)
    with pytest.raises(TypeError, match="image"):
        ledger.complete("s1/a", Source.DEVICE, image=b"")  # type: ignore[call-arg]
    with pytest.raises(RelaydiffError, match="max_entries must be a positive integer, got 0"):
        Ledger(max_entries=0)
    with pytest.raises(RelaydiffError, match="max_age_s must be a positive number of seconds, got -1"):
        Ledger(max_age_s=-1)
