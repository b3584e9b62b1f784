"""Scheduling Events on the pod, as HAMi writes them, and how often they reach the API.

What the events say (HAMi v2.10, ``pkg/scheduler/event.go`` and ``scheduler.go``), so
``kubectl describe pod`` tells a vslice pod's story as it tells a HAMi pod's:

- ``FilteringFailed`` (Warning): one event per failure reason, ``"<n> nodes
  <Reason>(<node>,<node>)"`` with the nodes sorted (``score.go``,
  ``recordFilteringFailures``; the reasons are the counted ``"<k>/<cards> <Reason>"``
  parts of each node's failure, read as ``common.ParseReason`` reads them: a part of
  another shape names no reason), then ``"no available node, <n> nodes do not meet"``
  with the number of candidates (``scheduler.go``, ``Filter``); or the error when the
  filter itself failed;
- ``FilteringSucceed`` (Normal): ``"find fit node(<node>), <n> nodes not fit, <m> nodes
  fit(<node>:<score>,...)"`` with scores to two decimals, in ascending order of score
  (``genSuccessMsg``; HAMi lists its sorted score list, whose last node is the chosen);
- ``BindingSucceed`` (Normal): ``"Successfully binding node [<node>] to
  <namespace>/<pod>"``; ``BindingFailed`` (Warning): the bind's error
  (``recordScheduleBindingResultEvent``).

How often (``Recorder``): kube-scheduler retries a pending pod about every second, and
each retry would repeat the same events. Kubernetes' own event recorder folds repeats
into one Event whose ``count`` and ``lastTimestamp`` grow (client-go
``tools/record/events_cache.go``, ``EventCorrelator``); ``Recorder`` does the same with a
time limit: the first occurrence of a (pod, reason, message) creates an Event, later ones
are counted, and the count is written at most once per ``interval_s`` (on the next
occurrence or ``flush``). New messages for one (pod, reason) create at most ``burst``
Events per ``interval_s``; more are dropped and counted (Kubernetes' spam filter drops
too). A series unseen for ``ttl_s`` is forgotten (the next occurrence creates a new Event,
as the API server expires Events after an hour by default).

Pure and synchronous: the caller passes the time and carries out the actions.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from libshared.resources import PodRequest
from services.scheduler.core import scoring
from services.scheduler.core.clusters import Cluster

FILTERING_FAILED = "FilteringFailed"
FILTERING_SUCCEED = "FilteringSucceed"
BINDING_FAILED = "BindingFailed"
BINDING_SUCCEED = "BindingSucceed"
NORMAL = "Normal"
WARNING = "Warning"

# one counted part of a node's failure, "2/4 CardInsufficientMemory" (HAMi GenReason);
# HAMi's reasons are CamelCase words, which keeps a summary ("0/3 nodes fit") out
_PART = re.compile(r"^\s*(\d+)/\d+ ([A-Z]\w*)")


@dataclass(frozen=True)
class Note:
    """One Event to record on a pod: ``type`` (``Normal`` / ``Warning``), ``reason``,
    ``message``."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class PodRef:
    """The pod an Event is about (its ``involvedObject``)."""

    uid: str
    namespace: str
    name: str


def parse_reason(text: str) -> dict[str, int]:
    """Reason -> count of the ``"<k>/<cards> <Reason>"`` parts of ``text`` (split on
    ``", "``); other parts are skipped, as HAMi's ``common.ParseReason`` skips what its
    ``Sscanf`` cannot read (a part whose reason is not a CamelCase word too)."""
    out: dict[str, int] = {}
    for part in text.split(", "):
        got = _PART.match(part)
        if got:
            out[got.group(2)] = int(got.group(1))
    return out


def filtering_failed(failed: Mapping[str, str], *, candidates: int) -> list[Note]:
    """HAMi's FilteringFailed events for a pod that fits none of ``candidates`` nodes,
    ``failed`` being node -> the core's reason. Reasons in name order (HAMi walks a Go
    map, in no fixed order)."""
    nodes: dict[str, list[str]] = {}
    for node, why in failed.items():
        for reason in parse_reason(why):
            nodes.setdefault(reason, []).append(node)
    out = [
        Note(WARNING, FILTERING_FAILED, f"{len(ns)} nodes {reason}({','.join(sorted(ns))})")
        for reason, ns in sorted(nodes.items())
    ]
    out.append(
        Note(WARNING, FILTERING_FAILED, f"no available node, {candidates} nodes do not meet")
    )
    return out


def filtering_error(error: str) -> Note:
    """FilteringFailed for a filter that failed with ``error``."""
    return Note(WARNING, FILTERING_FAILED, error)


def filtering_succeed(chosen: str, *, candidates: int, scores: Mapping[str, float]) -> Note:
    """HAMi's FilteringSucceed: ``chosen`` among ``candidates`` nodes, ``scores`` the
    fitting nodes' scores (ascending in the message, ties by name, the chosen last among
    its equals)."""
    order = sorted(scores.items(), key=lambda kv: (kv[1], kv[0] == chosen, kv[0]))
    listed = ",".join(f"{n}:{s:.2f}" for n, s in order)
    return Note(
        NORMAL,
        FILTERING_SUCCEED,
        f"find fit node({chosen}), {candidates - len(scores)} nodes not fit, "
        f"{len(scores)} nodes fit({listed})",
    )


def binding_succeed(node: str, pod: PodRef) -> Note:
    """HAMi's BindingSucceed (Go's ``%v`` of a one-node slice: ``[node]``)."""
    return Note(
        NORMAL,
        BINDING_SUCCEED,
        f"Successfully binding node [{node}] to {pod.namespace}/{pod.name}",
    )


def binding_failed(error: str) -> Note:
    """HAMi's BindingFailed: the bind's error."""
    return Note(WARNING, BINDING_FAILED, error)


def node_scores(cluster: Cluster, pod: PodRequest, nodes: Iterable[str]) -> dict[str, float]:
    """HAMi's node score (``scoring.hami_node_score``: 0-30, higher is fuller, from the
    node's usage before the pod, as HAMi ranks nodes) of each of ``nodes`` the cluster
    knows, as the FilteringSucceed message lists them; empty for a pod without GPUs."""
    if not pod.gpu_containers or cluster.size == 0:
        return {}
    score = scoring.hami_node_score(cluster)
    out = {}
    for node in nodes:
        i = cluster.node_index.get(node)
        if i is not None:
            out[node] = round(float(score[i]), 2)
    return out


# -- the rate limit -----------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """Create Event ``name`` in ``pod.namespace`` for ``note``: count 1, first and last
    seen at ``at_s`` (Unix seconds)."""

    pod: PodRef
    note: Note
    name: str
    at_s: float


@dataclass(frozen=True)
class Patch:
    """Set Event ``name``'s ``count`` and ``lastTimestamp`` (``last_s``, Unix seconds)."""

    namespace: str
    name: str
    count: int
    last_s: float


Action = Create | Patch


@dataclass
class _Series:
    name: str
    namespace: str
    written: int  # the count the API has
    pending: int  # occurrences since
    last_s: float  # last occurrence
    written_s: float  # last write


@dataclass
class RecorderStats:
    """``created`` Events, count ``patches``, occurrences ``folded`` into a count,
    ``dropped`` by the burst limit."""

    created: int = 0
    patches: int = 0
    folded: int = 0
    dropped: int = 0


@dataclass
class Recorder:
    """The rate limit of the module docstring: ``interval_s`` between writes of one
    series, ``burst`` new Events per (pod, reason) per ``interval_s``, ``ttl_s`` before an
    idle series is forgotten, at most ``max_series`` series kept (the oldest go first)."""

    interval_s: float = 30.0
    burst: int = 8
    ttl_s: float = 600.0
    max_series: int = 4096
    stats: RecorderStats = field(default_factory=RecorderStats)
    _series: OrderedDict[tuple[str, str, str, str], _Series] = field(
        default_factory=OrderedDict, init=False
    )
    _creates: dict[tuple[str, str], list[float]] = field(default_factory=dict, init=False)
    _seq: int = field(default=0, init=False)

    @property
    def series(self) -> int:
        """How many series (one Event each) are kept."""
        return len(self._series)

    def observe(self, pod: PodRef, notes: Iterable[Note], *, now: float) -> list[Action]:
        """Take in ``notes`` about ``pod`` at Unix time ``now``; the writes due."""
        out: list[Action] = []
        for note in notes:
            action = self._one(pod, note, now=now)
            if action is not None:
                out.append(action)
        return out

    def _one(self, pod: PodRef, note: Note, *, now: float) -> Action | None:
        key = (pod.uid, note.type, note.reason, note.message)
        series = self._series.get(key)
        if series is not None and now - series.last_s > self.ttl_s:
            del self._series[key]
            series = None
        if series is None:
            window = [
                t
                for t in self._creates.get((pod.uid, note.reason), [])
                if now - t < self.interval_s
            ]
            if len(window) >= self.burst:
                self.stats.dropped += 1
                self._creates[(pod.uid, note.reason)] = window
                return None
            window.append(now)
            self._creates[(pod.uid, note.reason)] = window
            self._seq += 1
            name = f"{pod.name}.{int(now * 1e9) + self._seq:x}"
            self._series[key] = _Series(
                name=name, namespace=pod.namespace, written=1, pending=0, last_s=now, written_s=now
            )
            self._trim()
            self.stats.created += 1
            return Create(pod=pod, note=note, name=name, at_s=now)
        self._series.move_to_end(key)
        series.pending += 1
        series.last_s = now
        if now - series.written_s < self.interval_s:
            self.stats.folded += 1
            return None
        return self._write(series, now=now)

    def _write(self, series: _Series, *, now: float) -> Patch:
        series.written += series.pending
        series.pending = 0
        series.written_s = now
        self.stats.patches += 1
        return Patch(
            namespace=series.namespace, name=series.name, count=series.written, last_s=series.last_s
        )

    def flush(self, *, now: float) -> list[Patch]:
        """Counts folded at least ``interval_s`` ago and not written yet; forgets idle
        series."""
        out = []
        for key, series in list(self._series.items()):
            if series.pending and now - series.written_s >= self.interval_s:
                out.append(self._write(series, now=now))
            elif not series.pending and now - series.last_s > self.ttl_s:
                del self._series[key]
        self._creates = {
            k: kept
            for k, times in self._creates.items()
            if (kept := [t for t in times if now - t < self.interval_s])
        }
        return out

    def lost(self, action: Action) -> None:
        """The API did not take ``action`` (the Event is gone or was never made): forget
        its series, so the next occurrence creates a new Event."""
        name = action.name
        for key, series in list(self._series.items()):
            if series.name == name:
                del self._series[key]

    def forget(self, pod_uid: str) -> None:
        """Drop every series of a pod that is gone."""
        for key in [k for k in self._series if k[0] == pod_uid]:
            del self._series[key]
        for k in [k for k in self._creates if k[0] == pod_uid]:
            del self._creates[k]

    def _trim(self) -> None:
        while len(self._series) > self.max_series:
            self._series.popitem(last=False)
