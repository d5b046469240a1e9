"""The metrics themselves: plain-number families expose what prometheus_client's objects do."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from mailsrv.ops.families import CounterFamily, GaugeFamily, HistogramFamily

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# --- the families against prometheus_client's own objects --------------------------------------

BUCKETS = (0.5, 1.0, 4.0)
# (what, labels, its prometheus_client object, its family, what is done to each)
Operation = Callable[[Any], None]
PARITY: list[tuple[str, list[str], Callable[..., Any], Callable[..., Any], list[Operation]]] = [
    ("counter", [], Counter, CounterFamily, [lambda m: m.inc(), lambda m: m.inc(2.5)]),
    (
        "counter with labels",
        ["listener", "reason"],
        Counter,
        CounterFamily,
        [
            lambda m: m.labels("mx", "connection-rate").inc(),
            lambda m: m.labels("mx", "connection-rate").inc(),
            lambda m: m.labels("submission", "shutting-down").inc(3),
            lambda m: m.labels("smtps", "ip-connection-limit"),  # made, never counted
        ],
    ),
    ("gauge", [], Gauge, GaugeFamily, [lambda m: m.set(7), lambda m: m.set(1.9e9)]),
    (
        "gauge with labels",
        ["state"],
        Gauge,
        GaugeFamily,
        [
            lambda m: m.labels("pending").inc(),
            lambda m: m.labels("pending").inc(),
            lambda m: m.labels("pending").dec(),
            lambda m: m.labels("held").set(-2),
        ],
    ),
    (
        "histogram",
        [],
        lambda *a, **kw: Histogram(*a, buckets=BUCKETS, **kw),
        lambda *a, **kw: HistogramFamily(*a, buckets=BUCKETS, **kw),
        # on a bound, between bounds, below the first, above the last, zero
        [lambda m, v=v: m.observe(v) for v in (0.5, 0.75, 0.1, 99.0, 0.0, 1.0, 4.0)],
    ),
    (
        "histogram with labels",
        ["endpoint"],
        lambda *a, **kw: Histogram(*a, buckets=BUCKETS, **kw),
        lambda *a, **kw: HistogramFamily(*a, buckets=BUCKETS, **kw),
        [
            lambda m: m.labels("a").observe(0.2),
            lambda m: m.labels("b").observe(5),
            lambda m: m.labels("a").observe(1.0),
        ],
    ),
]


def exposition(make: Callable[..., Any], labels: list[str], operations: list[Operation]) -> str:
    registry = CollectorRegistry()
    metric = make("mailsrv_thing", "What is counted", labels, registry=registry)
    for operation in operations:
        operation(metric)
    text = generate_latest(registry).decode()
    return "".join(line + "\n" for line in text.splitlines() if "_created" not in line)


@pytest.mark.parametrize(
    ("labels", "library", "family", "operations"),
    [row[1:] for row in PARITY],
    ids=[row[0] for row in PARITY],
)
def test_a_family_exposes_what_the_prometheus_client_object_does(
    labels: list[str],
    library: Callable[..., Any],
    family: Callable[..., Any],
    operations: list[Operation],
) -> None:
    expected = exposition(library, labels, operations)
    assert "mailsrv_thing" in expected
    assert exposition(family, labels, operations) == expected
    assert exposition(family, labels, []) == exposition(library, labels, [])


BAD_USES: list[tuple[str, Callable[[], Any]]] = [
    ("too few label values", lambda: CounterFamily("x", "d", ["a", "b"]).labels("1")),
    ("too many label values", lambda: GaugeFamily("x", "d", ["a"]).labels("1", "2")),
    ("labels on an unlabelled family", lambda: CounterFamily("x", "d").labels("1")),
    ("unlabelled use of a labelled family", lambda: HistogramFamily("x", "d", ["a"]).observe(1)),
    ("a counter going down", lambda: CounterFamily("x", "d").inc(-1)),
]


@pytest.mark.parametrize("use", [row[1] for row in BAD_USES], ids=[row[0] for row in BAD_USES])
def test_misuse_of_a_family_is_a_value_error(use: Callable[[], Any]) -> None:
    with pytest.raises(ValueError):
        use()


def test_a_histogram_without_inf_gets_it() -> None:
    histogram = HistogramFamily("x", "d", buckets=(2.0, 1.0))
    histogram.observe(math.inf)
    (family,) = histogram.collect()
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name == "x_bucket"]
    assert buckets == [("1.0", 0.0), ("2.0", 0.0), ("+Inf", 1.0)]
