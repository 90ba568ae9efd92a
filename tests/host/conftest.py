"""The host tests use the fixtures shared with the runtime tests."""

from service_fixtures import *  # noqa: F401,F403  (pytest finds fixtures by name in conftest)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_instance():  # type: ignore[no-untyped-def]
    """One local Ray instance (with Serve, no HTTP) for the whole test session: starting Ray takes tens of seconds."""
    pytest.importorskip("ray.serve")
    from relaydiff.host.cluster import ray_init

    started = ray_init(None, num_cpus=2)
    yield
    if started:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
