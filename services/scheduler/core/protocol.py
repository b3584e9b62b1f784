"""The replicas' commit protocol: what a pod's claim says, when a request may still commit,
and what a schedule or a release does on finding a claim. Pure.

A replica places a pod in five steps: claim (``kv.create`` of the pod's key in
``<prefix>-pods``), decide, compare-and-set the node's ledger, confirm the claim (a slow
commit only), announce; a release tombstones the claim, then frees the slices. The I/O of
each step is ``services.scheduler.adapters.bus``; every choice between steps is made here,
so the same rules run on the bus and in the interleaving tests
(``tests/scheduler/test_protocol.py``), where two or three replicas, releases, expiring
deadlines, lost replies and crashes are shuffled against an in-memory bucket.

The value of a pod's key is one of three (``Claim``):

- ``HELD``: a replica's token (``token``): that replica is placing the pod, or placed it.
- ``RELEASED``: a tombstone. A release writes it *before* freeing the slices, so a
  schedule request for the UID that arrives late (delayed behind a paused replica, or
  re-sent by a client that gave up) finds it and is refused instead of bringing the pod
  back; a holder that commits after it loses its confirmation and takes its slices back.
  It is kept ``TOMBSTONE_TTL_S`` (written with that per-message TTL: nats-server removes
  it then, unless the key was written again), far
  longer than any request may wait (``MAX_DEADLINE_S``), so a request that could still
  commit always finds it. A UID is therefore not scheduled again within that time:
  Kubernetes never re-uses a UID, and ``vslice run`` draws a fresh one for every run.
- ``REFUSED``: the reason of the last ``Unschedulable`` answer. A request with the
  client's deadline header takes it over and decides afresh; one without it (its client's
  earlier copy may be this one, late) is answered the same reason again, until the server
  removes the marker after ``REFUSAL_TTL_S`` (its per-message TTL). So a pod once
  answered Unschedulable is not placed by a late copy of the request its client already
  has an answer for.

Deadlines: a request carries its client's deadline (``libshared.subjects.DEADLINE_HEADER``)
or is given one at the door (``door_deadline``); a replica checks it before claiming and
again immediately before the ledger compare-and-set (``may_commit``), so a request whose
reply will never be read commits nothing.

What it leaves to others: reading and writing the buckets, views and waiting
(``services.scheduler.adapters.bus``), deleting orphan claims
(``services.scheduler.core.upkeeping``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

# A request without the client's deadline header may be committed for this long after it
# reached the replica: the default request timeout of vslice's own clients
# (``vslice.running.REQUEST_TIMEOUT_S``).
DEFAULT_DEADLINE_S = 10.0
# A client's deadline further ahead than this is brought forward to it: the bound every
# tombstone's lifetime is measured against.
MAX_DEADLINE_S = 60.0
# How long a release's tombstone stays: well past any deadline (``MAX_DEADLINE_S``).
TOMBSTONE_TTL_S = 600.0
# How long an Unschedulable answer is repeated to requests without a deadline header.
REFUSAL_TTL_S = 60.0
MAX_REASON_CHARS = 512  # of the reason kept in a refusal marker


class ClaimKind(enum.Enum):
    """What a pod's key in ``<prefix>-pods`` says (see the module docstring)."""

    HELD = "held"
    RELEASED = "released"
    REFUSED = "refused"


@dataclass(frozen=True)
class Claim:
    """A decoded claim value: ``token`` of a ``HELD`` claim, ``reason`` of a ``REFUSED``."""

    kind: ClaimKind
    token: bytes = b""
    reason: str = ""


class _Marker(msgspec.Struct, frozen=True, kw_only=True):
    state: str
    reason: str = ""


_MARKER = msgspec.json.Decoder(_Marker)
_ENCODER = msgspec.json.Encoder()
TOMBSTONE = _ENCODER.encode(_Marker(state=ClaimKind.RELEASED.value))


def token(replica: str, request: str) -> bytes:
    """The claim value of ``request`` (an id unique in the replica's life, and across
    its restarts) of ``replica``. Never starts with ``{`` (which begins a marker)."""
    name = f"_{replica}" if replica.startswith("{") else replica
    return f"{name} {request}".encode()


def refusal(reason: str) -> bytes:
    """The marker value that repeats ``reason`` (cut to ``MAX_REASON_CHARS``)."""
    return _ENCODER.encode(_Marker(state=ClaimKind.REFUSED.value, reason=reason[:MAX_REASON_CHARS]))


def decode_claim(value: bytes) -> Claim:
    """The claim a key's ``value`` holds. Any value not a marker is a holder's token
    (claims written before markers existed were plain tokens too); a marker that does
    not decode is taken for a tombstone, the answer that places nothing."""
    if not value.startswith(b"{"):
        return Claim(kind=ClaimKind.HELD, token=value)
    try:
        marker = _MARKER.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Claim(kind=ClaimKind.RELEASED)
    if marker.state == ClaimKind.REFUSED.value:
        return Claim(kind=ClaimKind.REFUSED, reason=marker.reason)
    return Claim(kind=ClaimKind.RELEASED)


# -- deadlines -------------------------------------------------------------------------


def door_deadline(
    client: float | None,
    *,
    now: float,
    default_s: float = DEFAULT_DEADLINE_S,
    max_s: float = MAX_DEADLINE_S,
) -> float:
    """The deadline (Unix seconds) a request is handled under: the client's, brought
    forward to at most ``now + max_s``; ``now + default_s`` when it has none. ``now`` is
    when the request reached the replica (Unix seconds)."""
    if client is None:
        return now + min(default_s, max_s)
    return min(client, now + max_s)


def may_commit(deadline: float | None, *, now: float) -> bool:
    """True while a request's reply can still be read (``deadline`` None: a caller in
    process, which always reads it). Checked before claiming and immediately before the
    ledger compare-and-set."""
    return deadline is None or now <= deadline


# -- a schedule that finds a claim -------------------------------------------------------


class Found(enum.Enum):
    """What a schedule request does with the claim it found at its pod's key."""

    CLAIM = "claim"  # none there: create it again
    OURS = "ours"  # this request's own token: it holds the claim
    WAIT = "wait"  # another request holds it: wait for its placement, or take it over
    TAKE_OVER = "take over"  # a refusal, and the request may decide afresh: CAS it
    REFUSE = "refuse"  # a tombstone, or a refusal to repeat: answer Unschedulable


def on_claim(claim: Claim | None, *, mine: bytes, stale_copy_possible: bool) -> Found:
    """What to do about ``claim`` (None: no key). ``stale_copy_possible``: the request
    came without its client's deadline header, so it may be a late copy of a request
    already answered (see the module docstring)."""
    if claim is None:
        return Found.CLAIM
    if claim.kind is ClaimKind.RELEASED:
        return Found.REFUSE
    if claim.kind is ClaimKind.REFUSED:
        return Found.REFUSE if stale_copy_possible else Found.TAKE_OVER
    return Found.OURS if claim.token == mine else Found.WAIT


def refused_reason(pod_uid: str, claim: Claim) -> str:
    """The ``Unschedulable`` reason for a request refused by ``claim`` (``on_claim``
    returned ``REFUSE``)."""
    if claim.kind is ClaimKind.REFUSED:
        return (
            f"{claim.reason} (repeated: pod {pod_uid} was answered so within the last"
            f" {REFUSAL_TTL_S:.0f} s and the request carries no deadline header)"
        )
    return (
        f"pod {pod_uid} was released: a released pod UID is not scheduled again"
        f" (its tombstone is kept {TOMBSTONE_TTL_S:.0f} s)"
    )


def may_take_over(*, unchanged_s: float, claim_wait_s: float, placed: bool) -> bool:
    """True when another request's claim may be taken over: it kept its revision for
    ``claim_wait_s`` seconds (its holder died or stalls) and a caught-up view shows the
    pod in no ledger (``placed`` False)."""
    return not placed and unchanged_s >= claim_wait_s


def must_confirm(*, elapsed_s: float, claim_wait_s: float) -> bool:
    """True when a commit made ``elapsed_s`` seconds after its claim was written must
    confirm the claim before it is answered. A claim is taken over or tombstoned only
    after it stayed unchanged ``claim_wait_s`` seconds with the pod in no caught-up
    view; a commit within half of that is in any such view, so only a slower one can
    have lost its claim (clocks need only run at about the same rate)."""
    return elapsed_s >= claim_wait_s / 2


# -- a release that finds a claim ----------------------------------------------------------


class Releasing(enum.Enum):
    """What a release does with the claim at its pod's key before freeing slices."""

    TOMBSTONE = "tombstone"  # write the tombstone (create, or CAS on the claim's revision)
    WAIT = "wait"  # a request is placing the pod right now: wait for it
    FREE = "free"  # tombstoned already: free the slices


def on_release(
    claim: Claim | None, *, placed: bool, unchanged_s: float, claim_wait_s: float
) -> Releasing:
    """What a release does about ``claim`` (None: no key). ``placed``: a caught-up view
    holds the pod in a ledger; ``unchanged_s``: how long the claim kept its revision.

    A claim held while the pod is in no ledger is a placement under way: the release
    waits for it (its commit, then freed, or its refusal) up to ``claim_wait_s``, then
    tombstones it all the same, and a slower commit fails its confirmation
    (``must_confirm``) and is taken back."""
    if claim is not None and claim.kind is ClaimKind.RELEASED:
        return Releasing.FREE
    if claim is None or claim.kind is ClaimKind.REFUSED or placed:
        return Releasing.TOMBSTONE
    if unchanged_s >= claim_wait_s:
        return Releasing.TOMBSTONE
    return Releasing.WAIT
