"""Reading Prometheus text exposition back into samples, for assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, frozenset[tuple[str, str]], float]


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Label set -> value of every sample called ``name`` in ``text``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


def labelled(name: str, text: str, **labels: str) -> list[float]:
    """Values of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return [v for k, v in samples(text, name).items() if want <= k]
