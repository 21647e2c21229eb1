import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

from dist_pool import DistPool

_POOL: DistPool | None = None


@pytest.fixture
def dist_pool():
    """Two real gloo ranks, started once per session (restarted after a hang)."""
    global _POOL
    if _POOL is None or _POOL.broken:
        _POOL = DistPool(world_size=2)
    return _POOL


def pytest_sessionfinish(session, exitstatus):
    if _POOL is not None and not _POOL.broken:
        _POOL.close()
