"""Fixtures shared by the runtime and host tests: a torch device runtime over the tiny pair, one torch thread, link helpers."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def device_runtime(tiny_pair):  # type: ignore[no-untyped-def]
    from relaydiff.runtime.backends import create_backend
    from relaydiff.runtime.device import DeviceRuntime

    return DeviceRuntime(create_backend("torch", model=tiny_pair[1]))


@pytest.fixture(autouse=True)
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread: the tiny models gain nothing from more, and the link tests run many of them at once."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOKEN = "link-test-token"


@pytest.fixture()
def token() -> str:
    return TOKEN


@pytest.fixture()
def link_config():  # type: ignore[no-untyped-def]
    """Short timeouts, so that a test that goes wrong fails fast instead of hanging."""
    from relaydiff.link.config import LinkConfig

    return LinkConfig(open_timeout_s=3.0, handshake_timeout_s=3.0, recv_timeout_s=10.0, send_timeout_s=5.0, close_timeout_s=0.5)


@pytest.fixture()
def make_host(tiny_pair, link_config):  # type: ignore[no-untyped-def]
    """make_host(fraction=..., steps=..., **config) -> an unstarted HostServer on 127.0.0.1 with the tiny pair."""
    from relaydiff.host.controller import HostConfig, HostServer
    from relaydiff.host.policy import FixedPolicy
    from relaydiff.runtime.settings import GenerationSettings

    def make(fraction: float | None = 0.5, steps: int = 4, **config):  # type: ignore[no-untyped-def]
        cfg = HostConfig(settings=GenerationSettings(steps=steps), link=link_config, **config)
        return HostServer(tiny_pair[0], tiny_pair[1], auth_token=TOKEN, policy=FixedPolicy(fraction), config=cfg)

    return make


@pytest.fixture()
def make_client(device_runtime, link_config):  # type: ignore[no-untyped-def]
    """make_client(url, token=TOKEN, steps=4, **kw) -> a DeviceClient on the shared tiny device runtime."""
    from relaydiff.runtime.client import DeviceClient
    from relaydiff.runtime.settings import GenerationSettings

    def make(url: str, token: str = TOKEN, steps: int = 4, **kw):  # type: ignore[no-untyped-def]
        return DeviceClient(device_runtime, url, auth_token=token, settings=GenerationSettings(steps=steps),
                            link_config=link_config, **kw)

    return make


@pytest.fixture()
def service_main():  # type: ignore[no-untyped-def]
    """service_main(argv) -> exit status: the `relaydiff host|device` commands as relaydiff.cli will run them."""
    import argparse

    from relaydiff.core.errors import RelaydiffError
    from relaydiff.cli.service import COMMANDS, add_parsers

    def main(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="relaydiff")
        add_parsers(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        try:
            return COMMANDS[args.command](args)
        except RelaydiffError as exc:
            print(f"relaydiff: error: {exc}")
            return 2

    return main
