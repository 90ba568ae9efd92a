"""The runtime tests use the fixtures shared with the host tests."""

from service_fixtures import *  # noqa: F401,F403  (pytest finds fixtures by name in conftest)
