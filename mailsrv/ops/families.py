"""Counters, gauges and histograms whose values are plain numbers, exported as custom collectors.

prometheus_client's own metric objects take a lock on every update, and a histogram walks its
buckets in Python: several microseconds per message on the SMTP hot path (measured in the
commit that brought this module).  Every update here is an attribute increment instead; the
families become Prometheus samples only when a scrape collects them
(:class:`~prometheus_client.core.CounterMetricFamily` and friends), so the exposition
(names, labels, ``le`` bounds, values) is the one prometheus_client's objects give, less their
``_created`` timestamps.

**Threads.**  Only the reactor thread changes values (every component that counts runs there);
a scrape renders in an I/O thread and only reads them.  Reading a number and copying a dict
or a list are each atomic under the GIL, so a scrape sees each value as it was at some instant
during the scrape (a histogram's sum may be one observation ahead of its buckets, as with
prometheus_client), without locks.  Never update a family from another thread: ``+=`` is not
atomic.

The API is the subset of prometheus_client's the server uses: ``labels(*values)`` returns the
child for those label values (made on first use and then shared, so hot paths keep it), and
an unlabelled family is its own only child (``inc``, ``dec``, ``set``, ``observe``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class CounterValue:
    """One counter: only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class GaugeValue:
    """One gauge: set, or moved up and down."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the gauge to ``value``."""
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.value -= amount


class HistogramValue:
    """One histogram: a count per bucket (not cumulative) and the sum of what was observed."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # sorted, ending with +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose upper bound is at least ``amount``."""
        self.sum += amount
        index = bisect.bisect_left(self._bounds, amount)
        if index < len(self.counts):  # NaN lands nowhere, as with prometheus_client
            self.counts[index] += 1


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)


class _Family(Collector, Generic[V]):
    """A named family of children keyed by their label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], V] = {}
        self._only: V | None = None  # an unlabelled family's one child
        if not self.labelnames:
            self._only = self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> V:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> V:
        """The child for these label values, in the order of the label names."""
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames) or not self.labelnames:
                raise ValueError(f"{self.name}: expected values for the labels {self.labelnames}")
            child = self._children[key] = self._new_child()
        return child

    def _unlabelled(self) -> V:
        if self._only is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels()")
        return self._only

    def _snapshot(self) -> list[tuple[list[str], V]]:
        """Every child with its label values (one atomic copy of the children)."""
        return [(list(key), child) for key, child in list(self._children.items())]

    def describe(self) -> Iterator[Metric]:
        yield self._family()


class CounterFamily(_Family[CounterValue]):
    """Counters, exported as ``<name>_total``."""

    def _new_child(self) -> CounterValue:
        return CounterValue()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, child in self._snapshot():
            family.add_metric(labels, child.value)
        yield family

    def inc(self, amount: float = 1.0) -> None:
        """Increment the only child of an unlabelled family."""
        self._unlabelled().inc(amount)


class GaugeFamily(_Family[GaugeValue]):
    """Gauges."""

    def _new_child(self) -> GaugeValue:
        return GaugeValue()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, child in self._snapshot():
            family.add_metric(labels, child.value)
        yield family

    def set(self, value: float) -> None:
        """Set the only child of an unlabelled family."""
        self._unlabelled().set(value)


class HistogramFamily(_Family[HistogramValue]):
    """Histograms with fixed upper bounds (``+Inf`` is added)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._le = [floatToGoString(bound) for bound in self._bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, child in self._snapshot():
            counts, total = list(child.counts), child.sum
            cumulative = list(zip(self._le, map(float, itertools.accumulate(counts)), strict=True))
            family.add_metric(labels, cumulative, total)
        yield family

    def observe(self, amount: float) -> None:
        """Observe ``amount`` in the only child of an unlabelled family."""
        self._unlabelled().observe(amount)
