"""Read values back from a /metrics body with prometheus-client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text-format body: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(text: str, metric: str, /, **labels: str) -> float | None:
    """The value of one sample (None: not in the body)."""
    return samples(text).get((metric, frozenset(labels.items())))


def family_types(text: str) -> dict[str, str]:
    """Family name (as the parser names it: counters without `_total`) -> type."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}
