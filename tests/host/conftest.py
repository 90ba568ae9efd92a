"""The host tests use the fixtures shared with the runtime tests."""

from service_fixtures import *  # noqa: F401,F403  (pytest finds fixtures by name in conftest)
