"""Registering a whole fleet at once gives the same view as registering it node by node."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.core.clusters import Cluster
from tests.scheduler.conftest import node

FLEET = [node("a", 2, cpu_milli=8000), node("b", 4, type="T4"), node("c", 1, unhealthy=(0,))]
ARRAYS = ("dev_valid", "dev_healthy", "dev_type", "dev_mem", "free_milli", "cpu_total", "offered")


@pytest.mark.parametrize("array", ARRAYS)
def test_a_fleet_registered_at_once_equals_one_registered_node_by_node(array):
    one_by_one = Cluster(max_devices=4)
    for reg in FLEET:
        one_by_one.upsert_node(reg)
    at_once = Cluster(max_devices=4)
    assert at_once.upsert_nodes(FLEET) == [0, 1, 2]
    assert at_once.nodes == one_by_one.nodes
    assert np.array_equal(getattr(at_once, array), getattr(one_by_one, array))


def test_registering_known_and_new_nodes_at_once_keeps_one_row_per_node():
    c = Cluster(max_devices=4)
    c.upsert_nodes(FLEET[:2])
    assert c.upsert_nodes([node("b", 3), node("d", 1)]) == [1, 2]
    assert c.size == 3
    assert c.version.shape == (3,)
    assert c.dev_valid[1].tolist() == [True, True, True, False]


def test_a_node_with_too_many_devices_fails_the_whole_batch_before_any_change():
    c = Cluster(max_devices=2)
    with pytest.raises(ValueError, match="'big' has 3 devices, max 2"):
        c.upsert_nodes([node("ok", 1), node("big", 3)])
    assert c.size == 0
    assert c.version.shape == (0,)
