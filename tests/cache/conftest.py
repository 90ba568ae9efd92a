"""A cache policy trained for a few updates on the tiny family (shared by the train, eval and CLI tests)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_policy_dir(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from relaydiff.cache.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("cache_policy")
    for mech in ("reuse", "forecast"):
        train(TrainConfig(out=folder / mech, family=tiny_family, mechanism=mech, max_updates=2, prompts=1, relay_steps=(0, 2),
                          steps=6, batch=2, group=2, hidden=8), resume=False)
    return folder


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny models run fastest on one thread; on a shared CPU more threads only contend (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
