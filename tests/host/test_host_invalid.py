"""Invalid host settings: policy fractions, host config, --listen."""

from __future__ import annotations

import pytest

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.controller import HostConfig, HostServer
from relaydiff.host.policy import FixedPolicy
from relaydiff.cli.service import parse_listen


@pytest.mark.parametrize("kwargs, match", [
    ({"fraction": 1.5}, r"FixedPolicy.fraction must be a number in \[0, 1\], got 1.5"),
    ({"fraction": float("nan")}, "got nan"),
    ({"min_fraction": -0.1}, "min_fraction must be"),
    ({"min_fraction": 0.9, "max_fraction": 0.1}, "min_fraction 0.9 exceeds max_fraction 0.1"),
])
def test_bad_policy_fractions(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RelaydiffError, match=match):
        FixedPolicy(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 0}, "workers must be a positive integer, got 0"),
    ({"port": 70000}, "port must be in"),
    ({"result_timeout_s": -1.0}, "result_timeout_s must be"),
])
def test_bad_host_config(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RelaydiffError, match=match):
        HostConfig(**kwargs)


def test_host_server_checks_its_collaborators(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="choose"):
        HostServer(*tiny_pair, auth_token="t", policy=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="HostConfig"):
        HostServer(*tiny_pair, auth_token="t", config={})  # type: ignore[arg-type]
    with pytest.raises(RelaydiffError, match="not started"):
        HostServer(*tiny_pair, auth_token="t").url


@pytest.mark.parametrize("text", ["8765", "localhost:", ":80", "127.0.0.1:99999", "127.0.0.1:x"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(RelaydiffError, match="--listen must be HOST:PORT"):
        parse_listen(text)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8765") == ("::1", 8765)
