"""What ``vslice status`` says, at any fleet size: a dict for machines, text for people.

A stack attached to a replay of the openb fleet holds over a thousand nodes and six
thousand GPUs; one line per GPU is a wall no one reads. The text gives totals per node
group (a node's name without its trailing number: ``openb-node-0042`` is in
``openb-node``) and the per-GPU table only when asked (``--nodes``). The dict is the one
``--json`` prints; other keys (credentials, certificates) are added beside the ones here,
so it stays a plain ``dict``.

Health comes from heartbeats (``libshared.heartbeats``), not from pids alone: a service
is healthy while it runs and its last heartbeat (matched by pid) is younger than
``heartbeats.STALE_INTERVALS`` intervals; a stopped process, a silent one and one whose
heartbeats could not be read are not. ``healthy`` is true only when every process is.

What it leaves to others: reading the state file, the buckets and the heartbeats
(``vslice.stacks``). Pure.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from libshared import heartbeats
from vslice.stacks import DeviceUse, Stack

GROUP_SUFFIX = re.compile(r"[-_.]?\d+$")
SMALL_FLEET_GPUS = 32  # up to this many GPUs, the per-GPU table fits a screen: shown anyway


def group_of(node: str) -> str:
    """The node group of ``node``: its name without a trailing number (and the separator
    before it); the name itself when that would leave nothing."""
    return GROUP_SUFFIX.sub("", node) or node


@dataclass(frozen=True)
class GroupTotal:
    """Totals of one node group: ``nodes``, ``gpus``, ``slices`` held, ``memory_mib`` held
    of ``memory_total_mib``, ``cores_percent`` held of ``cores_total_percent`` (100 per
    GPU)."""

    group: str
    nodes: int
    gpus: int
    slices: int
    memory_mib: int
    memory_total_mib: int
    cores_percent: int
    cores_total_percent: int


def group_totals(devices: Sequence[DeviceUse]) -> list[GroupTotal]:
    """Per node group totals of ``devices``, by group name."""
    per: dict[str, list[DeviceUse]] = {}
    for d in devices:
        per.setdefault(group_of(d.node), []).append(d)
    return [
        GroupTotal(
            group=name,
            nodes=len({d.node for d in held}),
            gpus=len(held),
            slices=sum(d.slices for d in held),
            memory_mib=sum(d.memory_mib for d in held),
            memory_total_mib=sum(d.memory_total_mib for d in held),
            cores_percent=sum(d.cores for d in held),
            cores_total_percent=100 * len(held),
        )
        for name, held in sorted(per.items())
    ]


def health(
    processes: Mapping[str, Mapping[str, Any]], beats: Sequence[heartbeats.Seen] | None
) -> dict[str, dict[str, Any]]:
    """The health of each process (``status``'s ``processes``) by name::

        {name: {"state": "healthy" | "unhealthy" | "stopped",
                "heartbeat_age_s": float | None, "reason": str}}

    ``nats`` is healthy while it runs (the heartbeats are read through it); every other
    process while it runs and the freshest heartbeat with its pid is not stale.
    ``beats``: the last heartbeats (None: they could not be read). Pure."""
    out: dict[str, dict[str, Any]] = {}
    for name, proc in processes.items():
        if proc["state"] != "running":
            out[name] = {"state": "stopped", "heartbeat_age_s": None, "reason": "not running"}
            continue
        if name == "nats":
            out[name] = {"state": "healthy", "heartbeat_age_s": None, "reason": ""}
            continue
        if beats is None:
            reason = "heartbeats unreadable"
            out[name] = {"state": "unhealthy", "heartbeat_age_s": None, "reason": reason}
            continue
        mine = [b for b in beats if b.heartbeat.pid == proc["pid"]]
        if not mine:
            out[name] = {"state": "unhealthy", "heartbeat_age_s": None, "reason": "no heartbeat"}
            continue
        last = min(mine, key=lambda b: b.age_s)
        age = round(last.age_s, 1)
        if last.stale:
            every = last.heartbeat.interval_s
            reason = f"no heartbeat for {last.age_s:.0f} s (one every {every:g} s)"
            out[name] = {"state": "unhealthy", "heartbeat_age_s": age, "reason": reason}
        else:
            out[name] = {"state": "healthy", "heartbeat_age_s": age, "reason": ""}
    return out


def status(
    state_dir: Path,
    stack: Stack | None,
    *,
    alive: Callable[[int], bool],
    devices: Sequence[DeviceUse] | None,
    fleet_error: str | None = None,
    nodes: bool = False,
    beats: Sequence[heartbeats.Seen] | None = None,
    quarantined: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The status of the stack recorded in ``state_dir`` (``stack``; None: none recorded)
    as a JSON-ready dict::

        {"state_dir": str, "up": bool, "nats_url": str | None, "prefix": str | None,
         "metrics_url": str | None, "policy": str | None,
         "processes": {name: {"pid": int, "state": "running" | "stopped"}},
         "health": {name: {"state": str, "heartbeat_age_s": float | None,
                           "reason": str}},  # see ``health``
         "healthy": bool,
         "fleet": {"error": str | None, "nodes": int, "gpus": int, "slices": int,
                   "memory_mib": int, "memory_total_mib": int, "cores_percent": int,
                   "cores_total_percent": int, "groups": [GroupTotal as a dict, ...],
                   "vendors": {vendor: devices},  # NVIDIA, DCU (libshared.vendors)
                   "quarantined": {node: "<reason>: <detail>"},
                   "devices": [DeviceUse as a dict, ...]  # only with nodes=True
                  }}

    ``devices``: the fleet's devices (None: not read, ``fleet_error`` says why);
    ``beats``: the services' last heartbeats (None: not read). ``quarantined``: the nodes
    whose registration or ledger cannot be read (``vslice.stacks.Fleet``)."""
    processes = {
        name: {"pid": pid, "state": "running" if alive(pid) else "stopped"}
        for name, pid in (stack.pids.items() if stack is not None else ())
    }
    held = list(devices or ())
    groups = group_totals(held)
    fleet: dict[str, Any] = {
        "error": fleet_error,
        "nodes": len({d.node for d in held}),
        "gpus": len(held),
        "slices": sum(g.slices for g in groups),
        "memory_mib": sum(g.memory_mib for g in groups),
        "memory_total_mib": sum(g.memory_total_mib for g in groups),
        "cores_percent": sum(g.cores_percent for g in groups),
        "cores_total_percent": sum(g.cores_total_percent for g in groups),
        "groups": [asdict(g) for g in groups],
        "vendors": dict(sorted(Counter(d.vendor for d in held).items())),
        "quarantined": dict(sorted((quarantined or {}).items())),
    }
    if nodes:
        fleet["devices"] = [asdict(d) for d in held]
    well = health(processes, beats)
    return {
        "state_dir": str(state_dir),
        "up": stack is not None and processes.get("nats", {}).get("state") == "running",
        "nats_url": stack.nats_url if stack else None,
        "prefix": stack.prefix if stack else None,
        "metrics_url": (stack.metrics_url or None) if stack else None,
        "policy": stack.policy if stack else None,
        "processes": processes,
        "health": well,
        "healthy": stack is not None and all(h["state"] == "healthy" for h in well.values()),
        "fleet": fleet,
    }


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def text(data: Mapping[str, Any], *, table: bool = False) -> str:
    """``status``'s dict for people: the stack, each process, then the fleet's totals per
    node group and, when the dict has the devices and ``table`` is set or the fleet has at
    most ``SMALL_FLEET_GPUS`` GPUs, every device."""
    if data["nats_url"] is None:
        return f"no stack up in {data['state_dir']}"
    lines = [f"stack in {data['state_dir']}, NATS {data['nats_url']} (prefix {data['prefix']})"]
    if data["metrics_url"]:
        url = data["metrics_url"]
        lines.append(f"dashboard {url}/ (Prometheus {url}/metrics)")
    well = data.get("health", {})
    for name, proc in data["processes"].items():
        state = "running" if proc["state"] == "running" else "NOT RUNNING"
        h = well.get(name, {})
        if h.get("state") == "unhealthy":
            state += f", UNHEALTHY: {h['reason']}"
        elif h.get("heartbeat_age_s") is not None:
            state += f", heartbeat {h['heartbeat_age_s']:.0f} s ago"
        lines.append(f"  {name:<14} pid {proc['pid']:<8} {state}")
    if any(p["state"] != "running" for p in data["processes"].values()):
        lines.append("  (`vslice up` starts the stopped ones again, NATS data kept)")
    if any(h["state"] == "unhealthy" for h in well.values()):
        lines.append(
            f"  (an UNHEALTHY process runs but is silent on the bus: see its log in"
            f" {data['state_dir']}/logs; once it is stopped, `vslice up` starts it again)"
        )
    fleet = data["fleet"]
    if not data["up"]:
        lines.append("fleet: unknown (nats-server is not running)")
        return "\n".join(lines)
    if fleet["error"]:
        lines.append(f"fleet: {fleet['error']}")
        return "\n".join(lines)
    held_back = fleet.get("quarantined") or {}
    if held_back:
        lines.append(
            f"{len(held_back)} node(s) quarantined, offered no new pod"
            " (`vslice repair NODE` rebuilds an unreadable or deleted ledger):"
        )
        lines += [f"  {node:<24}{why}" for node, why in held_back.items()]
    if not fleet["gpus"]:
        lines.append("fleet: no node registered")
        return "\n".join(lines)
    head = (
        f"{'node group':<24}{'nodes':>8}{'GPUs':>8}{'slices':>9}"
        f"{'memory MiB held':>32}{'cores held':>12}"
    )
    lines += ["", head, "-" * len(head)]
    rows = [*fleet["groups"]]
    if len(rows) > 1:
        rows.append({"group": "fleet", **{k: v for k, v in fleet.items() if k != "groups"}})
    for g in rows:
        share = _share(g["memory_mib"], g["memory_total_mib"])
        mem = f"{g['memory_mib']:,}/{g['memory_total_mib']:,} {share}"
        cores = _share(g["cores_percent"], g["cores_total_percent"])
        lines.append(
            f"{g['group']:<24} {g['nodes']:>7,} {g['gpus']:>7,} {g['slices']:>8,}"
            f" {mem:>31} {cores:>11}"
        )
    by_vendor = fleet.get("vendors") or {}
    others = any(v != "NVIDIA" for v in by_vendor)  # a fleet of GPUs alone reads as before
    if others:
        lines.append("devices by vendor: " + ", ".join(f"{v} {n:,}" for v, n in by_vendor.items()))
    if "devices" in fleet and (table or fleet["gpus"] <= SMALL_FLEET_GPUS):
        # the vendor column only where the fleet has another vendor's devices
        width = 8 if others else 0
        head = (
            f"{'node':<24}{'device':<28}{'vendor' if width else '':<{width}}{'slices':>8}"
            f"{'memory MiB':>20}{'cores %':>9}"
        )
        lines += ["", head]
        for d in fleet["devices"]:
            mem = f"{d['memory_mib']}/{d['memory_total_mib']}"
            slots = f"{d['slices']}/{d['split_count']}"
            vendor = d.get("vendor", "NVIDIA") if width else ""
            lines.append(
                f"{d['node']:<24}{d['uuid']:<28}{vendor:<{width}}{slots:>8}{mem:>20}{d['cores']:>9}"
            )
    else:
        lines.append("(`vslice status --nodes` lists every GPU; `--json` for machines)")
    return "\n".join(lines)
