"""``vslice.kubecerts.plan`` as a table: from the Secrets as they are (missing, valid,
unreadable, signed by another CA, for other names, expiring, a bad seed) to what the Job
keeps, creates or renews; and the authorization it renders from the seeds."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable

import pytest
from cryptography import x509

from libshared import permissions as perms
from libshared import trust
from libshared.subjects import Subjects
from vslice import kubecerts
from vslice.kubecerts import Action

State = dict[str, dict[str, bytes]]
CREATE, RENEW = Action.CREATE, Action.RENEW
LEAVES = kubecerts.leaves()
NAMES = [leaf.secret for leaf in LEAVES]
SEEDS = [i.secret for i in kubecerts.IDENTITIES]


def _issue(
    ca: dict[str, bytes], leaf: kubecerts.Leaf, hosts: tuple[str, ...] = ()
) -> dict[str, bytes]:
    cert, key = trust.issue_certificate(
        ca["tls.crt"], ca["tls.key"], common_name=leaf.common_name, hosts=hosts or leaf.hosts
    )
    return {"tls.crt": cert, "tls.key": key, "ca.crt": ca["tls.crt"]}


def _installed() -> State:
    """Everything a first run writes, valid."""
    cert, key = trust.new_ca()
    ca = {"tls.crt": cert, "tls.key": key}
    state: State = {kubecerts.CA_SECRET: ca}
    for leaf in LEAVES:
        state[leaf.secret] = _issue(ca, leaf)
    for identity in kubecerts.IDENTITIES:
        state[identity.secret] = {kubecerts.SEED_KEY: trust.new_nkey_seed()}
    return state


def _expiry(state: State) -> datetime.datetime:
    return x509.load_pem_x509_certificate(state[NAMES[0]]["tls.crt"]).not_valid_after_utc


def _another_ca(state: State) -> None:
    cert, key = trust.new_ca("another CA")
    leaf = LEAVES[1]
    state[leaf.secret] = {**_issue({"tls.crt": cert, "tls.key": key}, leaf)}
    state[leaf.secret]["ca.crt"] = state[kubecerts.CA_SECRET]["tls.crt"]


def _other_names(state: State) -> None:
    leaf = LEAVES[2]
    state[leaf.secret] = _issue(state[kubecerts.CA_SECRET], leaf, hosts=leaf.hosts[:-1])


def _swapped_key(state: State) -> None:
    state[NAMES[0]]["tls.key"] = state[NAMES[3]]["tls.key"]


def _stale_ca_file(state: State) -> None:
    state[NAMES[3]]["ca.crt"] = trust.new_ca()[0]


def _leaf_as_ca(state: State) -> None:  # a certificate that is no CA in the CA's place
    state[kubecerts.CA_SECRET] = {k: state[NAMES[0]][k] for k in ("tls.crt", "tls.key")}


NOW = "now"
CASES: list[tuple[str, Callable[[State], None], str, bool, dict[str, Action]]] = [
    # (case, change to a valid install, when, renew flag, every step that is not KEEP)
    (
        "a fresh namespace: everything is made",
        lambda s: s.clear(),
        NOW,
        False,
        {kubecerts.CA_SECRET: CREATE, **dict.fromkeys(NAMES + SEEDS, CREATE)},
    ),
    ("a valid install: everything is kept", lambda s: None, NOW, False, {}),
    (
        "--renew: every leaf renewed, the CA and the seeds kept",
        lambda s: None,
        NOW,
        True,
        dict.fromkeys(NAMES, RENEW),
    ),
    (
        "a lost CA: a new one and every leaf renewed; seeds kept",
        lambda s: s.pop(kubecerts.CA_SECRET),
        NOW,
        False,
        {kubecerts.CA_SECRET: CREATE, **dict.fromkeys(NAMES, RENEW)},
    ),
    (
        "an unreadable CA is replaced",
        lambda s: s[kubecerts.CA_SECRET].update({"tls.crt": b"garbage"}),
        NOW,
        False,
        {kubecerts.CA_SECRET: RENEW, **dict.fromkeys(NAMES, RENEW)},
    ),
    (
        "a certificate that is not a CA is replaced",
        _leaf_as_ca,
        NOW,
        False,
        {kubecerts.CA_SECRET: RENEW, **dict.fromkeys(NAMES, RENEW)},
    ),
    (
        "an expired CA is replaced",
        lambda s: None,
        "after the CA",
        False,
        {kubecerts.CA_SECRET: RENEW, **dict.fromkeys(NAMES, RENEW)},
    ),
    (
        "leaves within 30 days of expiry are renewed",
        lambda s: None,
        "20 days before",
        False,
        dict.fromkeys(NAMES, RENEW),
    ),
    ("leaves 40 days from expiry are kept", lambda s: None, "40 days before", False, {}),
    ("one missing leaf is created", lambda s: s.pop(NAMES[2]), NOW, False, {NAMES[2]: CREATE}),
    ("a leaf of another CA is renewed", _another_ca, NOW, False, {NAMES[1]: RENEW}),
    ("a leaf for other names is renewed", _other_names, NOW, False, {NAMES[2]: RENEW}),
    ("a leaf whose key is another's is renewed", _swapped_key, NOW, False, {NAMES[0]: RENEW}),
    ("a leaf with a stale ca.crt is renewed", _stale_ca_file, NOW, False, {NAMES[3]: RENEW}),
    (
        "a leaf without its key is renewed",
        lambda s: s[NAMES[1]].pop("tls.key"),
        NOW,
        False,
        {NAMES[1]: RENEW},
    ),
    (
        "a missing seed is created, the others kept",
        lambda s: s.pop(SEEDS[1]),
        NOW,
        False,
        {SEEDS[1]: CREATE},
    ),
    (
        "a seed Secret without its key is created",
        lambda s: s[SEEDS[0]].clear(),
        NOW,
        False,
        {SEEDS[0]: CREATE},
    ),
    (
        "a seed that is no NATS user seed is replaced",
        lambda s: s[SEEDS[2]].update({kubecerts.SEED_KEY: b"SAnotaseed"}),
        NOW,
        False,
        {SEEDS[2]: RENEW},
    ),
]


@pytest.mark.parametrize(
    ("case", "change", "when", "renew", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_the_plan_keeps_what_is_valid_and_makes_or_renews_the_rest(
    case: str,
    change: Callable[[State], None],
    when: str,
    renew: bool,
    expected: dict[str, Action],
) -> None:
    state = _installed()
    expiry = _expiry(state)
    now = {
        NOW: datetime.datetime.now(datetime.UTC),
        "20 days before": expiry - datetime.timedelta(days=20),
        "40 days before": expiry - datetime.timedelta(days=40),
        "after the CA": datetime.datetime.now(datetime.UTC)
        + datetime.timedelta(days=trust.CA_DAYS + 1),
    }[when]
    change(state)
    steps = kubecerts.plan(state, wanted=LEAVES, now=now, renew=renew)
    assert [s.secret for s in steps] == [kubecerts.CA_SECRET, *NAMES, *SEEDS]
    got = {s.secret: s.action for s in steps if s.action is not Action.KEEP}
    assert got == expected, [(s.secret, s.action.value, s.reason) for s in steps]
    assert all(s.reason for s in steps)


def test_every_leaf_names_what_its_clients_connect_to() -> None:
    hosts = {leaf.secret: set(leaf.hosts) for leaf in kubecerts.leaves(nats_replicas=5)}
    assert "vslice-admission.vslice-system.svc" in hosts["vslice-admission-tls"]
    assert {"vslice-scheduler.vslice-system.svc", "localhost", "127.0.0.1"} <= hosts[
        "vslice-scheduler-tls"
    ]
    assert {f"nats-{i}.nats-headless.vslice-system.svc" for i in range(5)} <= hosts[
        "vslice-nats-tls"
    ]
    assert {"nats.vslice-system.svc", "*.nats-headless.vslice-system.svc"} <= hosts[
        "vslice-nats-tls"
    ]
    other = {leaf.secret: set(leaf.hosts) for leaf in kubecerts.leaves(namespace="gpu")}
    assert "vslice-admission.gpu.svc" in other["vslice-admission-tls"]
    assert not any("vslice-system" in h for names in other.values() for h in names)


def test_the_authorization_gives_each_identitys_key_its_roles_permissions() -> None:
    seeds = {i.name: trust.new_nkey_seed() for i in kubecerts.IDENTITIES}
    conf = kubecerts.authorization_conf(seeds, prefix="gpu")
    assert conf.startswith(b"authorization: ")
    users = json.loads(conf.removeprefix(b"authorization: "))["users"]
    by_key = {u["nkey"]: u["permissions"] for u in users}
    assert len(by_key) == len(kubecerts.IDENTITIES)
    for identity in kubecerts.IDENTITIES:
        granted = perms.permissions(
            identity.role,
            subjects=Subjects(prefix="gpu"),
            identity=identity.name,
            node=identity.node,
        )
        got = by_key[trust.public_key(seeds[identity.name])]
        assert got["publish"]["allow"] == list(granted.publish)
        assert got["subscribe"]["allow"] == list(granted.subscribe)
        assert got.get("allow_responses", False) is granted.allow_responses
    with pytest.raises(trust.TrustError, match="nkey seed"):
        kubecerts.authorization_conf({**seeds, "metrics": b"SUnot"}, prefix="gpu")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--nats-replicas", "0"], "--nats-replicas 0"),
        (["--renew-within-days", "-1"], "--renew-within-days -1"),
        (["--prefix", "has space"], "--prefix 'has space'"),
    ],
)
def test_a_bad_flag_stops_the_job_naming_the_flag_and_value(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        kubecerts.parse(argv)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_jobs_flags_become_its_settings() -> None:
    argv = ["--namespace", "gpu", "--prefix", "lab", "--nats-replicas", "5", "--renew"]
    settings = kubecerts.parse([*argv, "--renew-within-days", "10", "--webhook-wait", "3"])
    assert (settings.namespace, settings.prefix, settings.nats_replicas) == ("gpu", "lab", 5)
    assert settings.renew and settings.renew_within == datetime.timedelta(days=10)
    assert settings.webhook_wait_s == 3.0
