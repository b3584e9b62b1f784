"""Hygon DCUs on a node: the mock DCU list (``VSLICE_MOCKDCU_DEVICES``), their
registration beside the NVIDIA GPUs (devices of vendor DCU, each vendor in its own node
annotation), and a DCU slice's container: ``HIP_VISIBLE_DEVICES`` and nothing of
libvgpu's."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from libshared import annotations as keys
from libshared import bounds, events, vendors
from libshared.ledgers import PodCharge, Slice
from services.nodeagent import settings as agent_settings
from services.nodeagent.adapters import dcus, gpus
from services.nodeagent.adapters.slicing import Slicer
from services.nodeagent.core import environments, fleets, nodeconfigs, preparing, registrations

D0 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d0"
D1 = "DCU-0a1b2c3d-0000-4000-8000-0000000000d1"
G0 = "GPU-0a1b2c3d-0000-4000-8000-0000000000a0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        (f"{D0}:65536", (fleets.MockDcu(uuid=D0, memory_mib=65536, model="Z100"),)),
        (
            f" {D0}:16384:K100 ,, {D1}:32768:Z100L ",
            (
                fleets.MockDcu(uuid=D0, memory_mib=16384, model="K100"),
                fleets.MockDcu(uuid=D1, memory_mib=32768, model="Z100L"),
            ),
        ),
        (f"{D0}:1:BW-1000_v2.0", (fleets.MockDcu(uuid=D0, memory_mib=1, model="BW-1000_v2.0"),)),
    ],
)
def test_the_mock_dcu_list_reads_uuid_memory_and_model(
    text: str, expected: tuple[fleets.MockDcu, ...]
) -> None:
    assert fleets.parse_dcus(text) == expected
    assert fleets.parse_dcus(fleets.dcu_list(expected)) == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (D0, f"entry '{D0}'"),
        (f"{D0}:", "memory ''"),
        (f"{D0}:0", "memory '0'"),
        (f"{D0}:-5", "memory '-5'"),
        (f"{D0}:1e3", "memory '1e3'"),
        (f"{D0}:{bounds.MAX_MEMORY_MIB + 1}", f"memory '{bounds.MAX_MEMORY_MIB + 1}'"),
        (":16384", "the UUID"),
        ("U" * (bounds.MAX_UUID + 1) + ":16384", "the UUID"),
        ("DCU-\x07:16384", "the UUID"),
        (f"{D0}:16384:Z 100", "model 'Z 100'"),
        (f"{D0}:16384:", "model ''"),
        (f"{D0}:16384:" + "Z" * 33, "model 'ZZZZ"),
        (f"{D0}:16384:Z100:extra", "expected <uuid>:<memory_mib>[:<model>]"),
        (f"{D0}:16384,{D0}:8192", "listed twice"),
        (",".join(f"DCU-{i}:1024" for i in range(17)), "more than 16 DCUs"),
        ("x" * (fleets.MAX_DCU_LIST + 1), "characters; at most 4,096"),
    ],
)
def test_a_malformed_mock_dcu_list_is_refused_naming_the_variable_and_the_entry(
    text: str, names: str
) -> None:
    with pytest.raises(ValueError) as info:
        fleets.parse_dcus(text)
    assert str(info.value).startswith("VSLICE_MOCKDCU_DEVICES")
    assert names in str(info.value)


def test_the_agents_dcus_flag_reads_the_variable_and_refuses_it_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"VSLICE_MOCKDCU_DEVICES": f"{D0}:65536:Z100", "VSLICE_HOST_ROOT": str(tmp_path)}
    got = agent_settings.parse([], env)
    assert got.slices is not None
    assert got.slices.dcus == (fleets.MockDcu(uuid=D0, memory_mib=65536, model="Z100"),)
    with pytest.raises(SystemExit):
        agent_settings.parse([], {**env, "VSLICE_MOCKDCU_DEVICES": f"{D0}:lots"})
    err = capsys.readouterr().err
    assert "VSLICE_MOCKDCU_DEVICES" in err and "memory 'lots'" in err
    with pytest.raises(SystemExit):
        agent_settings.parse(["--dcus", f"{D0}:1024"], {})
    assert "--dcus needs --host-root" in capsys.readouterr().err


def test_mock_dcus_are_discovered_in_list_order_indexed_from_zero_as_dcu_types() -> None:
    found = dcus.MockDcus(fleets.parse_dcus(f"{D0}:65536,{D1}:16384:K100")).discover()
    assert [(g.uuid, g.index, g.type, g.memory_mib, g.vendor) for g in found] == [
        (D0, 0, "DCU-Z100", 65536, "DCU"),
        (D1, 1, "DCU-K100", 16384, "DCU"),
    ]


def test_a_mixed_node_registers_its_dcus_beside_its_gpus_in_their_own_numbering() -> None:
    reg = registrations.node_devices(
        "n1",
        gpus.MockGpus([(G0, 16384)], gpu_type="MOCK").discover(),
        scaling=registrations.Scaling(split_count=4, memory_scaling=2.0, core_scaling=1.5),
        dcus=dcus.MockDcus(fleets.parse_dcus(f"{D0}:65536,{D1}:32768")).discover(),
        unhealthy=frozenset({D1}),
        cordoned=frozenset({D0}),
    )
    assert [
        (d.uuid, d.vendor, d.index, d.type, d.memory_mib, d.cores_percent, d.split_count)
        for d in reg.devices
    ] == [
        (G0, "NVIDIA", 0, "MOCK", 32768, 150, 4),
        # memory and core scaling are NVIDIA's settings; the split count is both vendors'
        (D0, "DCU", 0, "DCU-Z100", 65536, 100, 4),
        (D1, "DCU", 1, "DCU-Z100", 32768, 100, 4),
    ]
    assert [(d.healthy, d.cordoned, d.mode) for d in reg.devices[1:]] == [
        (True, True, "hami-core"),
        (False, False, "hami-core"),
    ]


def test_a_node_of_dcus_only_registers_them_and_an_empty_nvidia_list() -> None:
    reg = registrations.node_devices(
        "n1",
        [],
        scaling=registrations.Scaling(),
        dcus=dcus.MockDcus(fleets.parse_dcus(f"{D0}:65536")).discover(),
    )
    assert [(d.uuid, d.vendor) for d in reg.devices] == [(D0, "DCU")]
    assert keys.decode_node_devices(registrations.hami_register(reg)) == ()


def test_a_dcu_sharing_a_gpus_uuid_is_refused() -> None:
    with pytest.raises(ValueError, match="a device UUID appears twice"):
        registrations.node_devices(
            "n1",
            gpus.MockGpus([(G0, 16384)], gpu_type="MOCK").discover(),
            scaling=registrations.Scaling(),
            dcus=dcus.MockDcus(fleets.parse_dcus(f"{G0}:65536")).discover(),
        )


def test_each_vendor_annotation_lists_only_its_devices_with_a_reported_handshake() -> None:
    reg = registrations.node_devices(
        "n1",
        gpus.MockGpus([(G0, 16384)], gpu_type="MOCK").discover(),
        scaling=registrations.Scaling(split_count=4),
        dcus=dcus.MockDcus(fleets.parse_dcus(f"{D0}:65536")).discover(),
    )
    now = datetime.datetime(2026, 5, 1, 12, 30, 5, 123456, tzinfo=datetime.UTC)
    nvidia = registrations.vendor_annotations(reg, vendors.NVIDIA, now=now)
    dcu = registrations.vendor_annotations(reg, vendors.DCU, now=now)
    assert set(nvidia) == {"hami.io/node-nvidia-register", "hami.io/node-handshake"}
    assert set(dcu) == {"hami.io/node-dcu-register", "hami.io/node-handshake-dcu"}
    assert dcu["hami.io/node-handshake-dcu"] == "Reported 2026-05-01T12:30:05Z"
    listed = keys.decode_node_devices(nvidia["hami.io/node-nvidia-register"])
    assert [d.uuid for d in listed] == [G0]
    listed = keys.decode_node_devices(
        dcu["hami.io/node-dcu-register"], key=keys.NODE_DCU_REGISTER, vendor="DCU"
    )
    assert [
        (d.uuid, d.index, d.type, d.memory_mib, d.cores_percent, d.split_count) for d in listed
    ] == [(D0, 0, "DCU-Z100", 65536, 100, 4)]
    assert listed == reg.devices[1:]
    with pytest.raises(ValueError, match="no time zone"):
        registrations.handshake(datetime.datetime(2026, 5, 1))


def test_the_node_configs_split_count_and_uuid_filter_apply_to_dcus() -> None:
    config = b"""{"nodeconfig": [{"name": "n1", "devicesplitcount": 3,
        "filterdevices": {"uuid": ["%s"], "index": [0]}}]}""" % D1.encode()
    node = nodeconfigs.load(config, "n1", registrations.Scaling(), source="config.json")
    found_dcus = dcus.MockDcus(fleets.parse_dcus(f"{D0}:65536,{D1}:65536")).discover()
    reg = registrations.node_devices("n1", [], scaling=node.scaling, dcus=node.dcus(found_dcus))
    # index 0 of filterdevices is the NVIDIA GPU's; DCU 0 stays
    assert [(d.uuid, d.split_count) for d in reg.devices] == [(D0, 3)]


def _slice(uuid: str, index: int, *, vendor: str, container: str = "main") -> Slice:
    return Slice(
        pod_uid="uid-p1",
        namespace="default",
        pod="p1",
        container=container,
        container_index=0,
        uuid=uuid,
        device_index=index,
        memory_mib=8192,
        cores_percent=50,
        vendor=vendor,
    )


def _placement(*slices: Slice) -> events.Placement:
    return events.Placement(
        pod_uid="uid-p1",
        namespace="default",
        pod="p1",
        node="n1",
        slices=slices,
        charge=PodCharge(pod_uid="uid-p1"),
    )


MOCK = preparing.MockDriver(library_dir="/mock", state="/mock/state", devices=f"{G0}:16384")


def test_a_dcu_slice_gets_hip_visible_devices_and_nothing_of_libvgpu(tmp_path: Path) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/lib/libvgpu.so", mock=MOCK)
    # the ledger's device_index is the scheduler's slot (past the node's GPU); the
    # variable names the DCU's own index
    (plan,) = preparing.plan(
        _placement(_slice(D1, 2, vendor="DCU"), _slice(D0, 1, vendor="DCU")),
        layout,
        dcu_indices={D0: 0, D1: 1},
    )
    assert plan.env == {
        "HIP_VISIBLE_DEVICES": "0,1",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": plan.cache,
    }
    assert (plan.libvgpu, plan.cuda) == (False, False)
    assert [s.uuid for s in plan.slices] == [D0, D1]


def test_a_container_holding_a_gpu_and_a_dcu_gets_both_and_libvgpu_for_the_gpu(
    tmp_path: Path,
) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/lib/libvgpu.so")
    (plan,) = preparing.plan(
        _placement(_slice(D0, 1, vendor="DCU"), _slice(G0, 0, vendor="NVIDIA")),
        layout,
        dcu_indices={D0: 0},
    )
    assert plan.env["HIP_VISIBLE_DEVICES"] == "0"
    assert plan.env["NVIDIA_VISIBLE_DEVICES"] == G0
    assert plan.env["CUDA_DEVICE_MEMORY_LIMIT_0"] == "8192m"
    assert "CUDA_DEVICE_MEMORY_LIMIT_1" not in plan.env
    assert plan.env["LD_PRELOAD"] == "/lib/libvgpu.so"
    assert (plan.libvgpu, plan.cuda) == (True, True)
    assert [s.uuid for s in plan.slices] == [G0, D0]  # the CUDA device first


def test_a_dcu_the_node_does_not_hold_is_refused_naming_it(tmp_path: Path) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/lib/libvgpu.so")
    with pytest.raises(ValueError, match=f"slice {D1} of main: no such DCU on this node"):
        preparing.plan(_placement(_slice(D1, 2, vendor="DCU")), layout, dcu_indices={D0: 0})


def test_a_mock_nodes_answer_names_a_dcu_by_index_not_in_nvidia_visible_devices() -> None:
    env = environments.pod_env(_placement(_slice(D1, 3, vendor="DCU")), {D1: 1})
    assert env == {"main": {"HIP_VISIBLE_DEVICES": "1"}}
    # a DCU the mock node does not hold is refused, not named by its slot
    with pytest.raises(ValueError, match=f"slice {D1} of main: no such DCU on this node"):
        environments.pod_env(_placement(_slice(D1, 3, vendor="DCU")), {D0: 0})


def test_a_prepared_dcu_slice_is_reported_in_usage_without_a_hitch(tmp_path: Path) -> None:
    layout = preparing.Layout(root=str(tmp_path), libvgpu="/lib/libvgpu.so")
    slicer = Slicer(node="n1", layout=layout, dcu_indices={D0: 0})
    answer = slicer.prepare(_placement(_slice(D0, 0, vendor="DCU")))
    assert isinstance(answer, events.Ready)
    assert answer.env["main"]["HIP_VISIBLE_DEVICES"] == "0"
    usage = slicer.usage([], [], margin_bytes=0)
    assert usage.problems == ()
    assert [(c.pod_uid, c.uuid) for c in usage.containers] == [("uid-p1", D0)]
    assert usage.escapes == ()
