"""The generated kubelet API keeps the public v1beta1 names and field numbers, which is what
makes it wire-compatible with kubelet (the method paths and every tag on the wire)."""

from __future__ import annotations

import pytest

from services.nodeagent.adapters.kubeletapi import api_pb2 as api


def test_the_services_and_methods_are_kubelets() -> None:
    assert api.DESCRIPTOR.package == "v1beta1"
    methods = {
        s.full_name: sorted(m.name for m in s.methods)
        for s in api.DESCRIPTOR.services_by_name.values()
    }
    assert methods == {
        "v1beta1.Registration": ["Register"],
        "v1beta1.DevicePlugin": sorted(
            [
                "GetDevicePluginOptions",
                "ListAndWatch",
                "GetPreferredAllocation",
                "Allocate",
                "PreStartContainer",
            ]
        ),
    }
    list_and_watch = api.DESCRIPTOR.services_by_name["DevicePlugin"].methods_by_name["ListAndWatch"]
    assert list_and_watch.server_streaming and not list_and_watch.client_streaming


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        ("DevicePluginOptions", {"pre_start_required": 1, "get_preferred_allocation_available": 2}),
        ("RegisterRequest", {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4}),
        ("ListAndWatchResponse", {"devices": 1}),
        ("TopologyInfo", {"nodes": 1}),
        ("NUMANode", {"ID": 1}),
        ("Device", {"ID": 1, "health": 2, "topology": 3}),
        ("PreStartContainerRequest", {"devices_ids": 1}),
        ("PreferredAllocationRequest", {"container_requests": 1}),
        (
            "ContainerPreferredAllocationRequest",
            {"available_deviceIDs": 1, "must_include_deviceIDs": 2, "allocation_size": 3},
        ),
        ("PreferredAllocationResponse", {"container_responses": 1}),
        ("ContainerPreferredAllocationResponse", {"deviceIDs": 1}),
        ("AllocateRequest", {"container_requests": 1}),
        ("ContainerAllocateRequest", {"devices_ids": 1}),
        ("AllocateResponse", {"container_responses": 1}),
        (
            "ContainerAllocateResponse",
            {"envs": 1, "mounts": 2, "devices": 3, "annotations": 4, "cdi_devices": 5},
        ),
        ("Mount", {"container_path": 1, "host_path": 2, "read_only": 3}),
        ("DeviceSpec", {"container_path": 1, "host_path": 2, "permissions": 3}),
        ("CDIDevice", {"name": 1}),
    ],
)
def test_every_message_has_the_public_field_numbers(message: str, fields: dict[str, int]) -> None:
    descriptor = api.DESCRIPTOR.message_types_by_name[message]
    assert {f.name: f.number for f in descriptor.fields} == fields


def test_an_allocate_response_round_trips_on_the_wire() -> None:
    sent = api.AllocateResponse(
        container_responses=[
            api.ContainerAllocateResponse(
                envs={"CUDA_DEVICE_MEMORY_LIMIT_0": "3000m"},
                mounts=[api.Mount(container_path="/c", host_path="/h", read_only=True)],
            )
        ]
    )
    got = api.AllocateResponse.FromString(sent.SerializeToString())
    assert got.container_responses[0].envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "3000m"
    assert got.container_responses[0].mounts[0].read_only
