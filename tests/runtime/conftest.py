"""The runtime tests use the fixtures shared with the host tests, and one tiny bundle per session (runtime_bundles)."""

from runtime_bundles import *  # noqa: F401,F403  (pytest finds fixtures by name in conftest)
from service_fixtures import *  # noqa: F401,F403
