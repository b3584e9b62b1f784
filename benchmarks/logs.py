"""What a log line costs: the scheduler's decision line through the services' handler.

Writes N decision lines (``services.scheduler.adapters.decisions.scheduled``, a placement
of one slice) to a handler writing to memory, and prints microseconds per line for:

- ``stdlib text``: the standard library's ``logging.Formatter`` (the baseline);
- ``json``: ``libshared.logs.JsonFormatter`` alone (python-json-logger);
- ``json + collapse``: the handler ``libshared.logs.setup`` installs (JSON and the
  ``Collapse`` filter), every line distinct, as decision lines are;
- ``json + collapse, repeated``: the same handler given one line again and again (all
  but one dropped);
- ``turned down``: ``vslice.decisions`` at WARNING (the line is not built).

Each figure is the fastest of three rounds; ratios are against the baseline of the same
run. A decision takes about 3-4 ms of CPU
over the bus (README, "bus replay"), so tens of microseconds per line are noise there.

    .venv/bin/python benchmarks/logs.py --lines 20000
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from collections.abc import Callable

from libshared import events, logs
from libshared.ledgers import PodCharge, Slice
from libshared.resources import PodRequest
from services.scheduler.adapters import decisions

PLACED = events.Placement(
    pod_uid="uid-1",
    namespace="ml",
    pod="train",
    node="node-3",
    slices=(
        Slice(
            pod_uid="uid-1",
            namespace="ml",
            pod="train",
            container="main",
            container_index=0,
            uuid="GPU-aaaa",
            device_index=1,
            memory_mib=4000,
            cores_percent=30,
        ),
    ),
    charge=PodCharge(pod_uid="uid-1"),
)


def _install(handler: logging.Handler | None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler] if handler is not None else []
    root.setLevel(logging.INFO)
    logging.getLogger("vslice.decisions").setLevel(level)


def _run(lines: int, write: Callable[[int], None], *, rounds: int = 3) -> float:
    best = float("inf")  # the least disturbed of a few rounds: the machine is shared
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(lines):
            write(i)
        best = min(best, time.perf_counter() - started)
    return best / lines * 1e6


PODS: list[PodRequest] = []  # one pod per line (filled by main): every line is distinct


def _decision(i: int) -> None:
    pod = PODS[i]
    decisions.taking(pod.uid, pod)
    decisions.scheduled(PLACED, pod=pod, policy="hami", replica="r1")


def _same(_: int) -> None:
    logging.getLogger("vslice.test").warning("view behind the ledger", extra={"node": "n1"})


def main() -> None:
    """Print microseconds per line for each handler (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    lines = parser.parse_args().lines
    PODS[:] = [PodRequest(uid=f"uid-{i}", namespace="ml", name=f"train-{i}") for i in range(lines)]

    text = logging.StreamHandler(io.StringIO())
    text.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    json_only = logging.StreamHandler(io.StringIO())
    json_only.setFormatter(logs.JsonFormatter("scheduler"))
    rows: list[tuple[str, float]] = []
    _install(text)
    rows.append(("stdlib text", _run(lines, _decision)))
    _install(json_only)
    rows.append(("json", _run(lines, _decision)))
    collapsing = logs.setup("scheduler")
    collapsing.setStream(io.StringIO())  # type: ignore[attr-defined]
    rows.append(("json + collapse", _run(lines, _decision)))
    rows.append(("json + collapse, repeated", _run(lines, _same)))
    _install(collapsing, level=logging.WARNING)
    rows.append(("turned down", _run(lines, _decision)))
    base = rows[0][1]
    print(f"{lines} decision lines each")
    print(f"{'handler':28} {'us/line':>8} {'x baseline':>11}")
    for name, us in rows:
        print(f"{name:28} {us:8.1f} {us / base:11.2f}")


if __name__ == "__main__":
    main()
