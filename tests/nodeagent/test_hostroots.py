"""The host root: libvgpu installed versioned and atomically, cache files libvgpu follows."""

from __future__ import annotations

import os
from pathlib import Path

from libshared import events
from libshared.ledgers import NodeLedger, PodCharge, Slice
from services.nodeagent.adapters import hostroots
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import preparing, sharedcaches
from tests.libvgpu import harness

MIB = 1 << 20


def test_libvgpu_is_installed_as_a_versioned_file_behind_a_link_swung_atomically(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "v1.so", tmp_path / "v2.so"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    root = tmp_path / "root"
    link = hostroots.install_libvgpu(root, first)
    old_target = os.readlink(link)
    assert link.read_bytes() == b"one" and old_target.startswith("libvgpu-")
    assert hostroots.install_libvgpu(root, first) == link
    assert os.readlink(link) == old_target  # same version: nothing moves
    hostroots.install_libvgpu(root, second)
    assert link.read_bytes() == b"two" and os.readlink(link) != old_target
    # a process that mapped the old version keeps a file that still exists
    assert (root / "lib" / old_target).read_bytes() == b"one"
    assert not [p for p in (root / "lib").iterdir() if p.name.endswith(".tmp")]


def placement(uid: str, memory_mib: int) -> events.Placement:
    s = Slice(
        pod_uid=uid,
        namespace="ns",
        pod=uid,
        container="main",
        container_index=0,
        uuid="GPU-5a1ce000-0000-4000-8000-000000000000",
        device_index=0,
        memory_mib=memory_mib,
        cores_percent=0,
    )
    return events.Placement(
        pod_uid=uid,
        namespace="ns",
        pod=uid,
        node="n1",
        slices=(s,),
        charge=PodCharge(pod_uid=uid),
    )


def test_libvgpu_follows_the_cache_file_the_agent_made_and_it_is_never_replaced(
    native: None, tmp_path: Path
) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu=str(harness.LIBVGPU))
    (plan,) = preparing.plan(placement("p1", 300), layout)
    assert hostroots.prepare(plan) is True
    before = os.stat(plan.cache).st_ino
    # a process whose environment says otherwise still gets the agent's 300 MiB
    box = harness.Container(root=tmp_path, env={"CUDA_DEVICE_MEMORY_LIMIT_0": "900m"})
    box_env = {"CUDA_DEVICE_MEMORY_SHARED_CACHE": plan.cache}
    result = box.run("probe", "meminfo", "fill", "64m", env=box_env)
    assert result.of("meminfo")[0].int("total") == 300 * MIB
    assert result.of("fill")[0].int("count") == 300 // 64
    (again,) = preparing.plan(placement("p1", 300), layout)
    assert hostroots.prepare(again) is False
    assert os.stat(plan.cache).st_ino == before


def test_a_released_slice_stays_while_its_process_runs_and_goes_after_the_grace(
    native: None, tmp_path: Path
) -> None:
    layout = preparing.Layout(root=str(tmp_path / "host"), libvgpu=str(harness.LIBVGPU))
    slicer = Slicer(node="n1", layout=layout, grace_s=10.0)
    ready = slicer.prepare(placement("p1", 256))
    assert isinstance(ready, events.Ready)
    env = ready.env["main"]
    box = harness.Container(root=tmp_path)
    running = box.start(
        "probe",
        "alloc",
        "32m",
        "ready",
        "wait",
        env={"CUDA_DEVICE_MEMORY_SHARED_CACHE": env["CUDA_DEVICE_MEMORY_SHARED_CACHE"]},
    )
    try:
        running.read_until("ready")
        assert slicer.release("p1", now=100.0) == ["p1_main"]
        assert slicer.sweep(now=105.0) == []  # grace not over
        assert slicer.sweep(now=200.0) == []  # its process still maps the cache
        assert hostroots.in_use(slicer.root, "p1_main") == [running.pid]
    finally:
        running.finish()
    assert slicer.sweep(now=200.0) == ["p1_main"]
    assert hostroots.existing(slicer.root) == []


def test_reconcile_prepares_what_the_ledger_holds_and_releases_what_it_does_not(
    tmp_path: Path,
) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/l.so")
    old = Slicer(node="n1", layout=layout)
    old.prepare(placement("gone", 100))
    old.prepare(placement("kept", 200))
    kept_inode = os.stat(tmp_path / "containers" / "kept_main" / "vgpu.cache").st_ino
    ledger = NodeLedger(
        node="n1", slices=placement("kept", 200).slices + placement("new", 300).slices
    )
    fresh = Slicer(node="n1", layout=layout, grace_s=0.0)
    prepared, orphans = fresh.reconcile(ledger)
    assert (prepared, orphans) == (["kept", "new"], ["gone_main"])
    assert os.stat(tmp_path / "containers" / "kept_main" / "vgpu.cache").st_ino == kept_inode
    assert fresh.sweep() == ["gone_main"]
    assert hostroots.existing(tmp_path) == ["kept_main", "new_main"]


def test_a_truncated_or_foreign_cache_file_is_read_as_a_reason_not_an_error(
    tmp_path: Path,
) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/l.so")
    (plan,) = preparing.plan(placement("p1", 64), layout)
    hostroots.prepare(plan)
    Path(plan.cache).write_bytes(plan.cache_bytes[:3000])
    assert "slots" in str(hostroots.read_cache(tmp_path, "p1_main"))
    Path(plan.cache).write_bytes(b"\0" * 200)
    assert "magic" in str(hostroots.read_cache(tmp_path, "p1_main"))
    assert "No such file" in str(hostroots.read_cache(tmp_path, "nobody_main"))


def cache_limit_mib(path: str) -> int:
    return sharedcaches.decode(Path(path).read_bytes()).devices[0].limit_bytes // MIB


def test_pods_whose_uids_once_collided_get_their_own_limits_and_releasing_one_keeps_the_other(
    tmp_path: Path,
) -> None:
    slicer = Slicer(node="n1", layout=preparing.Layout(root=str(tmp_path), libvgpu="/l.so"))
    big, small = (
        slicer.prepare(placement("tenant/a", 4000)),
        slicer.prepare(placement("tenant-a", 1000)),
    )
    assert isinstance(big, events.Ready) and isinstance(small, events.Ready)
    big_cache = big.env["main"]["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
    small_cache = small.env["main"]["CUDA_DEVICE_MEMORY_SHARED_CACHE"]
    assert big_cache != small_cache
    assert (cache_limit_mib(big_cache), cache_limit_mib(small_cache)) == (4000, 1000)
    slicer.grace_s = 0.0
    slicer.release("tenant/a")
    assert slicer.sweep() == ["tenant%2fa_main"]
    assert cache_limit_mib(small_cache) == 1000
    assert hostroots.existing(tmp_path) == ["tenant-a_main"]


def legacy_dir(root: Path, name: str, memory_mib: int) -> Path:
    """A container directory as the earlier naming left it: a cache, no ``pod.uid``."""
    (plan,) = preparing.plan(placement("x", memory_mib), preparing.Layout(str(root), "/l.so"))
    directory = root / "containers" / name
    directory.mkdir(parents=True)
    (directory / preparing.CACHE_FILE).write_bytes(plan.cache_bytes)
    return directory


def test_reconcile_adopts_an_earlier_named_directory_only_when_it_is_certainly_the_pods(
    tmp_path: Path,
) -> None:
    kept = legacy_dir(tmp_path, "p1_main", 300)  # p1's under both namings
    inode = os.stat(kept / preparing.CACHE_FILE).st_ino
    legacy_dir(tmp_path, "tenant-a_main", 4000)  # tenant/a's or tenant-a's: unknown
    ledger = NodeLedger(
        node="n1",
        slices=(
            placement("p1", 300).slices
            + placement("tenant/a", 4000).slices
            + placement("tenant-a", 1000).slices
        ),
    )
    slicer = Slicer(
        node="n1", layout=preparing.Layout(root=str(tmp_path), libvgpu="/l.so"), grace_s=0.0
    )
    prepared, orphans = slicer.reconcile(ledger)
    assert prepared == ["p1", "tenant-a", "tenant/a"]
    assert orphans == ["tenant-a_main.legacy-1"]
    assert os.stat(kept / preparing.CACHE_FILE).st_ino == inode  # its processes keep it
    containers = tmp_path / "containers"
    assert cache_limit_mib(str(containers / "tenant-a_main" / "vgpu.cache")) == 1000
    assert cache_limit_mib(str(containers / "tenant%2fa_main" / "vgpu.cache")) == 4000
    assert slicer.sweep() == ["tenant-a_main.legacy-1"]
    assert hostroots.existing(tmp_path) == ["p1_main", "tenant%2fa_main", "tenant-a_main"]
