"""Shared fixtures; the helpers they hand out live in tests/cluster.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests.cluster import ClusterFactory, make_cluster

# Properties are checked, not timed: a loaded CI machine must not turn a slow example into a
# failure (speed is measured in bench/).
settings.register_profile("meshd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshd")


@pytest.fixture
def cluster() -> ClusterFactory:
    return make_cluster
