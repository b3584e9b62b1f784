"""FGD's fleet fragmentation (Weng et al., ATC'23, section 3) against a workload."""

from __future__ import annotations

import pytest

from libshared import fgd


def test_the_target_workload_takes_the_most_frequent_shapes_up_to_95_percent() -> None:
    tasks = [(500, 1)] * 60 + [(1000, 2)] * 36 + [(100, 1)] * 3 + [(200, 1)]
    load = fgd.workload(tasks)
    assert load.shapes == ((500, 1), (1000, 2))
    assert load.weights == pytest.approx((60 / 96, 36 / 96))


def test_no_task_measures_against_one_whole_gpu() -> None:
    assert fgd.workload([]) == fgd.Workload(shapes=((1000, 1),), weights=(1.0,))


@pytest.mark.parametrize("shape", [(0, 1), (1001, 1), (500, 0)])
def test_a_shape_out_of_range_is_refused_naming_it(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\)"):
        fgd.workload([shape])


@pytest.mark.parametrize(
    ("free", "shapes", "want"),
    [
        # the paper's rule: a shape that fits counts only the GPUs too small for it
        ((600, 300), [(500, 1)], 300),
        # a shape that cannot run counts every idle milli-GPU
        ((400, 300), [(500, 1)], 700),
        # a two-GPU shape needs two GPUs with room
        ((1000, 600), [(1000, 2)], 1600),
        ((1000, 1000, 200), [(1000, 2)], 200),
        # weighted over shapes: 1/2 x 300 + 1/2 x 900
        ((600, 300), [(500, 1), (700, 1)], 600),
        ((), [(500, 1)], 0),
    ],
)
def test_node_fragmentation_follows_the_papers_rule(
    free: tuple[int, ...], shapes: list[tuple[int, int]], want: float
) -> None:
    assert fgd.node_fragmentation(free, fgd.workload(shapes)) == pytest.approx(want)


def test_small_slices_leave_a_fleet_unfragmented_for_small_pods_but_not_for_whole_gpus() -> None:
    nodes = [(900, 900), (1000, 800)]
    small = fgd.fleet_fragmentation(nodes, fgd.workload([(100, 1)]))
    whole = fgd.fleet_fragmentation(nodes, fgd.workload([]))
    assert small.free_milli == whole.free_milli == 3600
    assert small.ratio_percent == 0.0
    assert whole.ratio_percent == pytest.approx(100 * 2600 / 3600)
    assert fgd.fleet_fragmentation([], fgd.workload([])).ratio_percent == 0.0
