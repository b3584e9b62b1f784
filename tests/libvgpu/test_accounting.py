"""Every allocation is charged once and given back once, however its process ends.

Found on the mock driver with a 4,096 MiB card and a 1,000 MiB slice: frees
after libvgpu's exit destructor, fork, exec and SIGKILL between two updates all
used to skew the container's charge in the shared cache.
"""

from __future__ import annotations

import os
import signal

from services.nodeagent.adapters import cachefiles
from tests.libvgpu import harness
from tests.libvgpu.harness import CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, MIB

SLICE = {"VSLICE_MOCKGPU_DEVICES": "GPU-acc0:4096", "CUDA_DEVICE_MEMORY_LIMIT": "1000m"}


def used_bytes(container: harness.Container) -> int:
    return cachefiles.read_shared_cache(container.cache).devices[0].used_bytes


def test_threads_freeing_while_main_returns_leave_the_charge_equal_to_what_is_held(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    holder = container.start("probe", "alloc", "500m", "wait")
    holder.read_until("waiting")
    for _ in range(30):
        container.run("probe", "exitrace", "4", "10m")
    after = used_bytes(container)
    third = container.run("probe", "alloc", "600m")
    holder.finish()
    assert after == 500 * MIB
    assert third.of("alloc")[0].int("rc") == CUDA_ERROR_OUT_OF_MEMORY


def test_a_free_in_a_library_destructor_after_libvgpus_credits_nothing_twice(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    holder = container.start("probe", "alloc", "400m", "wait")
    holder.read_until("waiting")
    freer = container.run(
        "probe",
        "meminfo",
        env={
            "LD_PRELOAD": f"{harness.LIBVGPU} {harness.BUILD / 'libexitfree.so'}",
            "EXITFREE_SIZE": "100m",
        },
    )
    after = used_bytes(container)
    holder.finish()
    assert freer.of("meminfo")[0].int("free") == 500 * MIB
    assert after == 400 * MIB


def test_sigkill_at_random_points_of_1000_iterations_never_skews_the_charge(
    container: harness.Container,
) -> None:
    # a 1 TiB mock card: the mock driver's own bookkeeping is not kill-safe and
    # must not run out of room over thousands of killed workers
    container.env.update(
        {"VSLICE_MOCKGPU_DEVICES": "GPU-acc0:1048576", "CUDA_DEVICE_MEMORY_LIMIT": "1000m"}
    )
    result = container.run("killstress", "1000", "3", str(100 * MIB), "7", timeout_s=300).of(
        "killstress"
    )[0]
    assert result.int("iterations") == 1000
    assert (result.int("mismatches"), result.int("first_bad")) == (0, 0)


def test_a_forked_child_freeing_its_parents_allocation_credits_nothing(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    result = container.run("probe", "alloc", "100m", "forkfree", "0", "meminfo")
    assert result.of("forkfree")[0].int("rc") == 0
    assert result.of("meminfo")[0].int("free") == 900 * MIB


def test_exec_gives_back_the_charge_of_the_image_it_replaced(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    result = container.run("probe", "alloc", "800m", "exec", "alloc", "800m", "meminfo")
    assert [a.int("rc") for a in result.of("alloc")] == [CUDA_SUCCESS, CUDA_SUCCESS]
    assert result.of("meminfo")[0].int("free") == 200 * MIB
    (process,) = cachefiles.read_shared_cache(container.cache).processes or (None,)
    assert process is None


def test_exec_into_a_program_without_libvgpu_gives_back_the_charge(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    sleeper = container.start("probe", "alloc", "800m", "ready", "execbare", "sleep", "30")
    sleeper.read_until("ready")
    try:
        # the same process, now an image that never frees (nor charges) anything
        harness.wait_for(lambda: os.readlink(f"/proc/{sleeper.pid}/exe").endswith("sleep"))
        result = container.run("probe", "alloc", "800m", "meminfo")
    finally:
        sleeper.kill()
    assert result.of("alloc")[0].int("rc") == CUDA_SUCCESS
    assert result.of("meminfo")[0].int("free") == 200 * MIB


def test_cuDeviceTotalMem_reports_the_slice_not_the_card(container: harness.Container) -> None:
    container.env.update(SLICE)
    result = container.run("probe", "totalmem")
    line = result.of("totalmem")[0]
    assert (line.int("rc"), line.int("total")) == (CUDA_SUCCESS, 1000 * MIB)


def test_a_wrapper_the_driver_calls_back_into_charges_once(
    container: harness.Container,
) -> None:
    # the mock's cuMemAllocAsync_ptsz calls its exported cuMemAllocAsync, which
    # the dynamic linker resolves to libvgpu's wrapper
    container.env.update(SLICE)
    # (the pool keeps a freed block until a synchronization)
    result = container.run("probe", "asyncptsz", "10m", "meminfo", "free", "0", "sync", "meminfo")
    charged, freed = result.of("meminfo")
    assert charged.int("free") == 990 * MIB
    assert freed.int("free") == 1000 * MIB


def test_memory_of_a_killed_process_shows_as_free_at_the_next_cuMemGetInfo(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    victim = container.start("probe", "alloc", "600m", "wait")
    victim.read_until("waiting")
    watcher = container.start("probe", "meminfo", "wait", "meminfo")
    (before,) = [line for line in watcher.read_until("waiting") if line.command == "meminfo"]
    victim.kill()
    (after,) = watcher.finish().of("meminfo")
    assert before.int("free") == 400 * MIB
    assert after.int("free") == 1000 * MIB


def test_a_lock_holder_that_never_lets_go_delays_attach_refusal_and_exit_by_at_most_1_s(
    container: harness.Container,
) -> None:
    container.env.update(SLICE)
    container.run("probe", "alloc", "1m")  # the file exists, as in a running container
    holder = container.start("lockholder", str(container.cache))
    assert holder.proc.stdout is not None
    assert holder.proc.stdout.readline().strip() == "locked"
    try:
        # the first allocation attaches; the second is refused after a reclaim
        probe = container.start("probe", "timedalloc", "1m", "timedalloc", "2000m")
        # and the exit (which gives the slot back) must not wait for the lock either
        result = probe.finish(timeout_s=30)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.kill()
    assert result.returncode == 0
    calls = result.of("timedalloc")
    assert [c.int("rc") for c in calls] == [CUDA_SUCCESS, CUDA_ERROR_OUT_OF_MEMORY]
    assert all(c.int("us") < 1_000_000 for c in calls), calls
