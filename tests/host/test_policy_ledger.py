"""FixedPolicy's choice of k and the ledger's exactly-once bookkeeping."""

from __future__ import annotations

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.ledger import Ledger, Source
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
    ledger = Ledger()
    ledger.accept("s1/a", "x")
    ledger.accept("s1/b", "y")
    assert [e.key for e in ledger.pending()] == ["s1/a", "s1/b"]
    assert ledger.complete("s1/a", Source.HOST_FALLBACK, latents=1)
    assert not ledger.complete("s1/a", Source.DEVICE, png=b"late")
    assert ledger.get("s1/a").source is Source.HOST_FALLBACK and ledger.get("s1/a").png is None
    assert ledger.refused == [("s1/a", Source.DEVICE)]
    assert [e.key for e in ledger.pending()] == ["s1/b"] and len(ledger) == 2


def test_ledger_refuses_unknown_and_reused_keys() -> None:
    ledger = Ledger()
    ledger.accept("s1/a", "x")
    with pytest.raises(RelaydiffError, match="'s1/a' is already in the ledger"):
        ledger.accept("s1/a", "x")
    with pytest.raises(RelaydiffError, match="'s1/zz' was never accepted"):
        ledger.complete("s1/zz", Source.DEVICE)
    with pytest.raises(TypeError, match="no field 'image'"):
        ledger.complete("s1/a", Source.DEVICE, image=b"")
