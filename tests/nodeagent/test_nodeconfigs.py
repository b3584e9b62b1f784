"""Per-node device configuration (HAMi's device plugin ``nodeconfig``): each key, the
overrides, and refusals that name the entry, key and value."""

from __future__ import annotations

import json

import pytest

from services.nodeagent.core import nodeconfigs, registrations
from services.nodeagent.core.nodeconfigs import NodeConfigError
from services.nodeagent.core.registrations import Gpu, Scaling

DEFAULTS = Scaling(split_count=10, memory_scaling=1.0, core_scaling=1.0)


def gpu(i: int, memory_mib: int = 16000) -> Gpu:
    return Gpu(uuid=f"GPU-{i}", index=i, model="T4", type="NVIDIA-T4", memory_mib=memory_mib)


FOUND = [gpu(0), gpu(1), gpu(2), gpu(3)]


def config(*entries: dict[str, object]) -> bytes:
    return json.dumps({"nodeconfig": list(entries)}).encode()


def registered(data: bytes, node: str = "n1") -> list[tuple[str, int, int, int]]:
    settings = nodeconfigs.load(data, node, DEFAULTS, source="config.json")
    reg = registrations.node_devices(node, settings.gpus(FOUND), scaling=settings.scaling)
    return [(d.uuid, d.memory_mib, d.cores_percent, d.split_count) for d in reg.devices]


# each key on its own: (entry beside "name": "n1", what n1's GPU-0 registers)
KEYS = [
    ({}, ("GPU-0", 16000, 100, 10)),
    ({"devicememoryscaling": 1.5}, ("GPU-0", 24000, 100, 10)),
    ({"devicememoryscaling": 0.5}, ("GPU-0", 8000, 100, 10)),
    ({"devicecorescaling": 2}, ("GPU-0", 16000, 200, 10)),
    ({"devicesplitcount": 4}, ("GPU-0", 16000, 100, 4)),
    ({"preconfigureddevicememory": 1000}, ("GPU-0", 1000, 100, 10)),
    ({"preconfigureddevicememory": 1000, "devicememoryscaling": 2}, ("GPU-0", 2000, 100, 10)),
    ({"preconfigureddevicememory": 0}, ("GPU-0", 16000, 100, 10)),
    ({"operatingmode": "hami-core"}, ("GPU-0", 16000, 100, 10)),
    ({"migstrategy": "mixed", "enablenumatopology": True}, ("GPU-0", 16000, 100, 10)),
    ({"enablegetpreferredallocation": True, "libcudaloglevel": 3}, ("GPU-0", 16000, 100, 10)),
]


@pytest.mark.parametrize(("entry", "first"), KEYS, ids=[json.dumps(e) for e, _ in KEYS])
def test_each_key_changes_what_the_node_registers(
    entry: dict[str, object], first: tuple[str, int, int, int]
) -> None:
    devices = registered(config({"name": "n1", **entry}))
    assert devices[0] == first
    assert len(devices) == 4


def test_filterdevices_leaves_gpus_out_by_uuid_and_by_index() -> None:
    data = config({"name": "n1", "filterdevices": {"uuid": ["GPU-1"], "index": [3]}})
    assert [d[0] for d in registered(data)] == ["GPU-0", "GPU-2"]
    only_index = config({"name": "n1", "filterdevices": {"index": [0]}})
    assert [d[0] for d in registered(only_index)] == ["GPU-1", "GPU-2", "GPU-3"]


def test_another_nodes_entry_leaves_the_defaults() -> None:
    data = config({"name": "other", "devicesplitcount": 2, "devicememoryscaling": 3})
    assert registered(data) == [(f"GPU-{i}", 16000, 100, 10) for i in range(4)]
    assert registered(config()) == registered(data)


def test_the_nodes_values_override_the_agents_defaults_and_the_rest_stay() -> None:
    defaults = Scaling(split_count=7, memory_scaling=2.0, core_scaling=1.5)
    got = nodeconfigs.load(
        config({"name": "n1", "devicesplitcount": 3}), "n1", defaults, source="f"
    )
    assert got.scaling == Scaling(split_count=3, memory_scaling=2.0, core_scaling=1.5)


def test_hamis_own_example_file_is_read() -> None:
    # the shape of HAMi's charts/hami/values.yaml example, values of our own
    data = b"""{
      "nodeconfig": [
        {
          "name": "n1",
          "operatingmode": "hami-core",
          "devicememoryscaling": 1,
          "devicesplitcount": 5,
          "preconfigureddevicememory": 0,
          "enablenumatopology": false,
          "migstrategy": "none",
          "filterdevices": {"uuid": [], "index": []},
          "enablegetpreferredallocation": false
        }
      ]
    }"""
    assert registered(data)[0] == ("GPU-0", 16000, 100, 5)


# (file, what the error must name)
BAD = [
    (b"{", "not JSON"),
    (b"[]", "Expected `object`"),
    (config({"name": "n1", "devicememoryscalling": 2}), "devicememoryscalling"),
    (config({"name": "n1", "devicememoryscaling": 0}), "devicememoryscaling"),
    (config({"name": "n1", "devicememoryscaling": -1.5}), "-1.5"),
    (config({"name": "n1", "devicecorescaling": 0.0}), "devicecorescaling"),
    (b'{"nodeconfig": [{"name": "n1", "devicememoryscaling": 1e999}]}', "devicememoryscaling"),
    (config({"name": "n1", "devicesplitcount": 0}), "devicesplitcount` (value: 0)"),
    (config({"name": "n1", "devicesplitcount": 2.5}), "devicesplitcount` (value: 2.5)"),
    (config({"name": "n1", "devicesplitcount": "4"}), "devicesplitcount` (value: '4')"),
    (config({"name": "n1", "operatingmode": "vgpu"}), "operatingmode` (value: 'vgpu')"),
    (config({"name": "n1", "migstrategy": "some"}), "migstrategy` (value: 'some')"),
    (config({"name": "n1", "filterdevices": {"index": [-1]}}), "index[0]` (value: -1)"),
    (config({"name": "n1", "filterdevices": {"uuids": []}}), "uuids"),
    (config({"name": "n1", "filterdevices": {"uuid": [""]}}), "uuid"),
    (config({"name": "n1", "preconfigureddevicememory": -5}), "(value: -5)"),
    (config({"devicesplitcount": 4}), "name"),
    (config({"name": ""}), "name"),
    (config({"name": "n1"}, {"name": "n1", "devicesplitcount": 2}), "a second entry for node 'n1'"),
    (b'{"nodeconfig": [], "extra": 1}', "extra"),
]


@pytest.mark.parametrize(("data", "named"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_file_is_refused_naming_the_key_and_value(data: bytes, named: str) -> None:
    with pytest.raises(NodeConfigError) as caught:
        nodeconfigs.parse(data, source="config.json")
    assert named in str(caught.value)
    assert str(caught.value).startswith("config.json")


def test_an_error_names_the_entry_it_is_in() -> None:
    data = config({"name": "n0"}, {"name": "n1", "devicecorescaling": -1})
    with pytest.raises(NodeConfigError, match=r"nodeconfig\[1\] \(n1\)\.devicecorescaling"):
        nodeconfigs.parse(data, source="config.json")


def test_a_file_over_the_size_bound_is_refused_before_it_is_decoded() -> None:
    data = b" " * (nodeconfigs.MAX_BYTES + 1)
    with pytest.raises(NodeConfigError, match="at most 1,048,576"):
        nodeconfigs.parse(data)


def test_an_mps_node_registers_its_gpus_in_mps_mode_and_an_unknown_mode_is_refused() -> None:
    data = config({"name": "n1", "operatingmode": "mps"}, {"name": "n2"})
    settings = nodeconfigs.load(data, "n1", DEFAULTS, source="config.json")
    assert settings.mode == "mps"
    reg = registrations.node_devices(
        "n1", settings.gpus(FOUND), scaling=settings.scaling, mode="mps"
    )
    assert {d.mode for d in reg.devices} == {"mps"}
    assert nodeconfigs.load(data, "n2", DEFAULTS, source="config.json").mode == "hami-core"
    with pytest.raises(NodeConfigError, match=r"operatingmode.*'vgpu'"):
        nodeconfigs.load(
            config({"name": "n1", "operatingmode": "vgpu"}), "n1", DEFAULTS, source="c"
        )


def a100(i: int, *, mig: bool = True, model: str = "NVIDIA A100-SXM4-40GB") -> Gpu:
    return Gpu(
        uuid=f"GPU-{i}",
        index=i,
        model=model,
        type="NVIDIA-A100",
        memory_mib=40960,
        mig_enabled=mig,
    )


def mig_config(
    *entries: dict[str, object], allow: list[dict[str, list[str]]] | None = None
) -> bytes:
    doc: dict[str, object] = {"nodeconfig": list(entries)}
    if allow is not None:
        doc["migProfileAllowlist"] = allow
    return json.dumps(doc).encode()


A100_PROFILES = ["1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"]

# (GPU found, node mode, allowlist, what it registers: None = left out, else its profiles)
MIG_CASES = [
    (a100(0), "mig", None, A100_PROFILES),
    (
        a100(0),
        "mig",
        [{"models": ["A100-SXM4-40GB"], "profiles": ["1g.5gb", "3g.20gb"]}],
        ["1g.5gb", "3g.20gb"],
    ),
    (a100(0), "mig", [{"models": ["NVIDIA A100-SXM4-40GB"], "profiles": ["7g.40gb"]}], ["7g.40gb"]),
    (a100(0), "mig", [{"models": ["H100-SXM5-80GB"], "profiles": ["1g.10gb"]}], None),
    (a100(0, mig=False), "mig", None, None),
    (
        a100(0, model="NVIDIA H100 80GB HBM3"),
        "mig",
        None,
        ["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    ),
    (a100(0, model="NVIDIA A30"), "mig", None, ["1g.6gb", "2g.12gb", "4g.24gb"]),
    (a100(0, model="Tesla T4", mig=True), "mig", None, None),
    (a100(0), "hami-core", None, None),
]


@pytest.mark.parametrize(("found", "mode", "allow", "profiles"), MIG_CASES)
def test_a_mig_node_registers_each_mig_gpu_with_its_allowed_profiles(
    found: Gpu, mode: str, allow: list[dict[str, list[str]]] | None, profiles: list[str] | None
) -> None:
    data = mig_config({"name": "n1", "operatingmode": mode}, allow=allow)
    settings = nodeconfigs.load(data, "n1", DEFAULTS, source="config.json")
    assert settings.mode == mode
    offered = settings.gpus([found])
    reg = registrations.node_devices(
        "n1", offered, scaling=settings.scaling, mig=settings.mig(offered)
    )
    if profiles is None:
        assert reg.devices == ()
        assert settings.left_out(found)
        return
    (dev,) = reg.devices
    assert not settings.left_out(found)
    assert dev.mode == "mig"
    assert [p.name for p in dev.mig_profiles] == profiles
    assert dev.mig_slots == (4 if "A30" in found.model else 8)
    assert dev.memory_mib == found.memory_mib  # never scaled: an instance is physical


def test_a_mig_gpu_on_a_hami_core_node_is_left_out_and_a_plain_one_kept() -> None:
    settings = nodeconfigs.load(config({"name": "n1"}), "n1", DEFAULTS, source="config.json")
    kept = settings.gpus([a100(0), a100(1, mig=False)])
    assert [g.uuid for g in kept] == ["GPU-1"]
    assert "MIG mode" in settings.left_out(a100(0))
    reg = registrations.node_devices("n1", kept, scaling=settings.scaling, mig=settings.mig(kept))
    assert [d.mode for d in reg.devices] == ["hami-core"]


def test_memory_scaling_and_preconfigured_memory_leave_a_mig_gpu_as_it_is() -> None:
    data = mig_config(
        {
            "name": "n1",
            "operatingmode": "mig",
            "devicememoryscaling": 2,
            "preconfigureddevicememory": 1000,
        }
    )
    settings = nodeconfigs.load(data, "n1", DEFAULTS, source="config.json")
    offered = settings.gpus([a100(0)])
    (dev,) = registrations.node_devices(
        "n1", offered, scaling=settings.scaling, mig=settings.mig(offered)
    ).devices
    assert dev.memory_mib == 40960


@pytest.mark.parametrize(
    ("allow", "named"),
    [
        ([{"models": ["A100"], "profiles": ["1g.5GB"]}], "profiles"),
        ([{"models": ["A100"], "profiles": ["x" * 40]}], "profiles"),
        ([{"models": ["A100"]}], "profiles"),
        ([{"models": ["A100"], "profiles": [], "extra": 1}], "extra"),
        ({"models": []}, "migProfileAllowlist"),
    ],
)
def test_a_bad_allowlist_is_refused_naming_its_key(allow: object, named: str) -> None:
    data = json.dumps({"nodeconfig": [], "migProfileAllowlist": allow}).encode()
    with pytest.raises(NodeConfigError, match=named):
        nodeconfigs.parse(data, source="config.json")


@pytest.mark.parametrize(
    ("model", "allow", "splits"),
    [
        ("NVIDIA A100-SXM4-40GB", None, 7),
        ("NVIDIA A30", None, 4),
        ("NVIDIA A100-SXM4-40GB", ["3g.20gb", "7g.40gb"], 2),
        ("NVIDIA A100-SXM4-40GB", ["7g.40gb"], 1),
    ],
)
def test_a_mig_gpu_offers_as_many_splits_as_instances_it_holds_at_once(
    model: str, allow: list[str] | None, splits: int
) -> None:
    capacity = registrations.mig_capacity(a100(0, model=model), allow)
    assert capacity is not None
    (dev,) = registrations.node_devices(
        "n1", [a100(0, model=model)], scaling=DEFAULTS, mig={"GPU-0": capacity}
    ).devices
    assert dev.split_count == splits
