"""Churn soak of a local stack: schedule/release and ``vslice run`` loops for minutes, with
what each process and the bus hold at the start and the end.

A ``vslice up`` stack (mock GPUs) in a temporary state directory takes ``--clients``
clients placing and releasing pods over the bus (each holds at most a few pods at a time)
and one loop of ``vslice run --gpumem ... -- true`` (a slice asked for, prepared, checked,
used by a process and released, with its lease), for ``--minutes`` minutes. After a
warm-up of ``--warmup`` seconds of the same churn (imports, caches and pools filled) and at
the end it samples:

- per process of the stack (and this driving process, ``client``): resident memory
  (``VmRSS`` of ``/proc/<pid>/status``, MiB) and open descriptors (``/proc/<pid>/fd``);
- per KV bucket: live keys, and the stream's messages and bytes (delete markers and
  history included);
- the allocation stream's messages and bytes;
- per stream: its consumers (watchers' ephemeral ones included: one left behind per
  read of a bucket used to stay 5 minutes, ``services.scheduler.adapters.upkeep``);

and prints both samples with the ratio end / start, flagging growth over 10 %. What is
expected to grow by design, and why, is printed under the table: each released pod leaves
its tombstone in ``<prefix>-pods`` for ``protocol.TOMBSTONE_TTL_S`` (600 s; nats-server
removes it by its per-message TTL, ``libshared.kvwrites``), an ended lease its marker for
``kvwrites.MARKER_TTL_S``, and the allocation stream keeps a day of messages (at most
32 MiB and 100,000: ``libshared/connecting.py``). A warm-up past 600 s starts the
measurement with the claims at their steady state.

    .venv/bin/python benchmarks/soak.py                 # 5 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from libshared import connecting, events, kvreads, watching
from libshared.connecting import BusSettings
from libshared.resources import ContainerRequest, PodRequest
from libshared.subjects import deadline_headers
from vslice import stacks

ROOT = Path(__file__).resolve().parents[1]
GROWTH_FLAG = 1.10  # end / start above this is flagged
# Consumers a stream may gain without a flag: each read of a whole bucket (the replicas'
# upkeep, every few seconds) keeps its consumer ``libshared.kvreads.IDLE_S`` after it, so
# a sample may catch a few of them (``services.scheduler.adapters.upkeep``).
CONSUMER_SLACK = 12
REQUEST_TIMEOUT_S = 10.0
HOLD_AT_MOST = 4  # pods one client holds at a time
MEMORY_CHOICES_MIB = (500, 1000, 2000, 4000)


@dataclass
class Churn:
    """What the loops did: pods ``placed``, ``released``, ``unschedulable``; ``runs`` of
    ``vslice run`` that exited 0 and ``run_failures`` (with the last failure's output)."""

    placed: int = 0
    released: int = 0
    unschedulable: int = 0
    errors: int = 0
    runs: int = 0
    run_failures: int = 0
    last_failure: str = ""


@dataclass
class Sample:
    """One sample (see the module docstring): ``at_s`` seconds into the soak."""

    at_s: float
    rss_mib: dict[str, float] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    stream_messages: dict[str, int] = field(default_factory=dict)
    stream_bytes: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, int] = field(default_factory=dict)


def vslice(args: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the ``vslice`` command line (this interpreter) with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "vslice.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (``VmRSS``); 0 when it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    """Open descriptors of ``pid``; -1 when they cannot be listed."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def live_keys(js: JetStreamContext, bucket: str) -> int:
    """How many live keys ``bucket`` has, counted on a headers-only read that keeps only
    the key names: this process's memory must not grow with the buckets it samples
    (reads keeping every entry of a 60,000-key bucket took it from 56 to 95 MiB over six
    reads; counting names only, to 69)."""
    pre, done = f"$KV.{bucket}.", asyncio.Event()
    live: set[str] = set()

    async def on_entry(msg: Msg) -> None:
        key = msg.subject[len(pre) :]
        if watching.is_removal(msg.headers):
            live.discard(key)
        else:
            live.add(key)
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await watching.subscribe_last(
        js, bucket, on_entry, done, headers_only=True, inactive_threshold=kvreads.IDLE_S
    )
    try:
        await done.wait()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return len(live)


async def sample(stack: stacks.Stack, at_s: float) -> Sample:
    """Processes and bus of ``stack`` now."""
    out = Sample(at_s=at_s)
    settings = stack.settings("operator")
    s = settings.subjects
    nc = await connecting.connect(settings, name="soak-sample")
    try:
        js = nc.jetstream()
        for bucket in (s.nodes_bucket, s.ledger_bucket, s.pods_bucket, s.leases_bucket):
            out.keys[bucket] = await live_keys(js, bucket)
            info = await js.stream_info(f"KV_{bucket}")
            out.stream_messages[bucket] = info.state.messages
            out.stream_bytes[bucket] = info.state.bytes
            out.consumers[bucket] = info.state.consumer_count
        info = await js.stream_info(s.alloc_stream)
        out.stream_messages[s.alloc_stream] = info.state.messages
        out.stream_bytes[s.alloc_stream] = info.state.bytes
        out.consumers[s.alloc_stream] = info.state.consumer_count
    finally:
        await nc.close()
    # after the reads: this process's own peak of reading every key (tens of thousands of
    # tombstones) is then in every sample, not only in the ones after the first read
    pids = {**stack.pids, "client": os.getpid()}
    for name, pid in pids.items():
        out.rss_mib[name] = rss_mib(pid)
        out.fds[name] = open_fds(pid)
    return out


async def ask(nc: Client, subject: str, body: bytes) -> bytes:
    """One request, retried on timeouts and answers that say it may be (the same pod)."""
    for _ in range(20):
        try:
            headers = deadline_headers(REQUEST_TIMEOUT_S, now=time.time())
            msg = await nc.request(subject, body, timeout=REQUEST_TIMEOUT_S, headers=headers)
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(0.2)
            continue
        retry_after_s = events.retry_after_of(msg.data)
        if retry_after_s is None:
            return bytes(msg.data)
        await asyncio.sleep(retry_after_s)
    raise TimeoutError(subject)


async def churn_client(
    cid: int, settings: BusSettings, churn: Churn, stop: asyncio.Event
) -> list[str]:
    """Place and release pods until ``stop``; returns the pods still held."""
    rng = random.Random(cid)
    s = settings.subjects
    nc = await connecting.connect(settings, name=f"soak-{cid}")
    held: list[str] = []
    n = 0
    try:
        while not stop.is_set():
            if held and (len(held) >= HOLD_AT_MOST or rng.random() < 0.5):
                uid = held.pop(rng.randrange(len(held)))
                body = events.ENCODER.encode(events.Release(pod_uid=uid))
                ack = events.RELEASE_REPLY.decode(await ask(nc, s.sched_release, body))
                if isinstance(ack, events.Ack):
                    churn.released += 1
                else:
                    churn.errors += 1
                continue
            n += 1
            uid = f"soak-{cid}-{n}"
            container = ContainerRequest(
                name="main",
                index=0,
                init=False,
                gpu_count=1,
                memory_mib=rng.choice(MEMORY_CHOICES_MIB),
                cores_percent=rng.choice((0, 10, 20)),
            )
            pod = PodRequest(uid=uid, namespace="soak", name=uid, containers=(container,))
            reply = events.SCHEDULE_REPLY.decode(
                await ask(nc, s.sched_schedule, events.ENCODER.encode(pod))
            )
            if isinstance(reply, events.Placement):
                churn.placed += 1
                held.append(uid)
            elif isinstance(reply, events.Unschedulable):
                churn.unschedulable += 1
            else:
                churn.errors += 1
        for uid in held:  # leave the fleet as found
            body = events.ENCODER.encode(events.Release(pod_uid=uid))
            await ask(nc, s.sched_release, body)
            churn.released += 1
        return held
    finally:
        await nc.close()


def run_loop(state_dir: Path, env: Mapping[str, str], churn: Churn, stop: asyncio.Event) -> None:
    """``vslice run --gpumem 500 -- true`` again and again until ``stop`` (in a thread)."""
    while not stop.is_set():
        done = vslice(["run", "--state-dir", str(state_dir), "--gpumem", "500", "--", "true"], env)
        if done.returncode == 0:
            churn.runs += 1
        else:
            churn.run_failures += 1
            churn.last_failure = (done.stdout + done.stderr)[-500:]


def table(start: Sample, end: Sample) -> list[str]:
    """The two samples side by side with the ratio, ``!`` on growth over 10 %. Pure."""
    lines = [f"{'':<34}{'start':>12}{'end':>12}{'end/start':>11}"]

    def row(what: str, a: float, b: float, fmt: str) -> None:
        ratio = b / a if a else (1.0 if b == a else float("inf"))
        flag = "  !" if ratio > GROWTH_FLAG else ""
        lines.append(f"{what:<34}{a:>12{fmt}}{b:>12{fmt}}{ratio:>10.2f}x{flag}")

    for name in start.rss_mib:
        row(f"RSS MiB  {name}", start.rss_mib[name], end.rss_mib.get(name, 0.0), ".1f")
    for name in start.fds:
        row(f"fds      {name}", start.fds[name], end.fds.get(name, 0), ".0f")
    for bucket in start.keys:
        row(f"keys     {bucket}", start.keys[bucket], end.keys.get(bucket, 0), ".0f")
    for stream in start.stream_messages:
        row(f"msgs     {stream}", start.stream_messages[stream], end.stream_messages[stream], ".0f")
    for stream in start.stream_bytes:
        row(f"bytes    {stream}", start.stream_bytes[stream], end.stream_bytes[stream], ".0f")
    for stream in start.consumers:
        row(f"consumers {stream}", start.consumers[stream], end.consumers.get(stream, 0), ".0f")
    return lines


# Rows expected to grow until their bound (see the module docstring): the bytes of the
# claims and leases buckets (tombstones and markers until their TTL) and of the
# allocation stream (a day, 32 MiB / 100,000 messages); told apart by ``by_design``.
BOUNDED_SUFFIXES = ("-pods", "-leases", "-alloc")


def by_design(row: str) -> bool:
    """True for a ``flagged`` row that grows by design until its bound. Pure."""
    return row.startswith("bytes ") and row.endswith(BOUNDED_SUFFIXES)


def flagged(start: Sample, end: Sample) -> list[str]:
    """What grew by more than 10 % (by row name). Pure."""
    out = []
    for what, a, b in (
        *((f"rss {k}", v, end.rss_mib.get(k, 0.0)) for k, v in start.rss_mib.items()),
        *((f"fds {k}", v, end.fds.get(k, 0)) for k, v in start.fds.items()),
        *((f"keys {k}", v, end.keys.get(k, 0)) for k, v in start.keys.items()),
        *((f"bytes {k}", v, end.stream_bytes.get(k, 0)) for k, v in start.stream_bytes.items()),
    ):
        if (a and b / a > GROWTH_FLAG) or (not a and b):
            out.append(what)
    for k, v in start.consumers.items():
        if end.consumers.get(k, 0) - v > CONSUMER_SLACK:
            out.append(f"consumers {k}")
    return out


@dataclass
class Soaked:
    """One soak's outcome: its settings, what the loops did, the samples taken idle, after
    the warm-up (``start``) and at the end, the rows that grew over 10 % (``flagged``; by
    design until their bounds: ``bounded``), whether each process was alive at the end, and
    the printed table."""

    minutes: float
    clients: int
    churn: Churn
    idle: Sample
    start: Sample
    end: Sample
    flagged: list[str]
    bounded: list[str]
    alive_at_end: dict[str, bool]
    table: list[str]


async def soak(*, minutes: float, warmup_s: float, clients: int, gpus: int) -> Soaked:
    """One soak (see the module docstring); returns its samples, churn and flags."""
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        env = {
            "VSLICE_MOCKGPU_COUNT": str(gpus),
            "VSLICE_MOCKGPU_MEMORY_MIB": "16000",
            "VSLICE_GPU_BACKEND": "mock",
            "VSLICE_METRICS_PORT": str(stacks.free_port()),
        }
        up = vslice(["up", "--state-dir", str(state_dir)], env)
        if up.returncode != 0:
            raise RuntimeError(f"vslice up failed:\n{up.stdout}\n{up.stderr}")
        try:
            stack = stacks.read_state(state_dir)
            assert stack is not None
            churn, stop = Churn(), asyncio.Event()
            began = time.monotonic()
            idle = await sample(stack, 0.0)
            loops = [
                asyncio.create_task(churn_client(i, stack.settings("cli"), churn, stop))
                for i in range(clients)
            ]
            runner = asyncio.create_task(asyncio.to_thread(run_loop, state_dir, env, churn, stop))
            await asyncio.sleep(warmup_s)
            start = await sample(stack, time.monotonic() - began)
            print(f"warm after {start.at_s:.0f} s: {asdict(churn)}", flush=True)
            end_at = began + warmup_s + minutes * 60
            while (left := end_at - time.monotonic()) > 0:
                await asyncio.sleep(min(30.0, left))
                rss = " ".join(f"{n} {rss_mib(p):.0f}" for n, p in stack.pids.items())
                print(
                    f"{time.monotonic() - began:.0f} s: placed {churn.placed},"
                    f" released {churn.released}, runs {churn.runs}; RSS MiB: {rss}",
                    flush=True,
                )
            end = await sample(stack, time.monotonic() - began)
            stop.set()
            await asyncio.gather(*loops, runner)
            alive = {name: stacks.alive(pid) for name, pid in stack.pids.items()}
        finally:
            vslice(["down", "--state-dir", str(state_dir)], env)
    grew = flagged(start, end)
    return Soaked(
        minutes=minutes,
        clients=clients,
        churn=churn,
        idle=idle,
        start=start,
        end=end,
        flagged=[row for row in grew if not by_design(row)],
        bounded=[row for row in grew if by_design(row)],
        alive_at_end=alive,
        table=table(start, end),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--minutes", type=float, default=5.0, help="soak after the warm-up")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of churn first")
    parser.add_argument("--clients", type=int, default=4, help="schedule/release loops")
    parser.add_argument("--gpus", type=int, default=4, help="mock GPUs of the node")
    parser.add_argument("--json", type=Path, help="write the samples here")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    result = asyncio.run(
        soak(minutes=args.minutes, warmup_s=args.warmup, clients=args.clients, gpus=args.gpus)
    )
    churn = result.churn
    print(
        f"{args.minutes:g} min after {args.warmup:.0f} s of warm-up, {args.clients} clients:"
        f" placed {churn.placed}, released {churn.released},"
        f" unschedulable {churn.unschedulable}, errors {churn.errors};"
        f" vslice run {churn.runs} ok, {churn.run_failures} failed"
    )
    for line in result.table:
        print(line)
    print(f"grew over 10 %: {', '.join(result.flagged) or 'nothing'}")
    print(
        f"grew over 10 % by design, until their bounds:"
        f" {', '.join(result.bounded) or 'nothing'}"
        " (KV_<prefix>-pods and -leases: a tombstone per released pod for 600 s and a"
        " marker per ended lease for 300 s, removed by nats-server at their TTL; the"
        " allocation stream: kept a day, at most 32 MiB / 100,000 messages)"
    )
    if churn.last_failure:
        print(f"last vslice run failure: {churn.last_failure}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0 if all(result.alive_at_end.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
