"""Shared fixtures; the helpers they hand out live in tests/cluster.py."""

from __future__ import annotations

import pytest

from tests.cluster import ClusterFactory, make_cluster


@pytest.fixture
def cluster() -> ClusterFactory:
    return make_cluster
