"""Metric families and their Prometheus text exposition (format 0.0.4): what
the agent serves on ``/metrics``.  Pure: families in, bytes out.

Written here, not taken from prometheus_client: importing any part of
prometheus_client runs its package ``__init__``, which loads its own HTTP
servers and push clients (``http.server``, ``urllib.request``, ``wsgiref``,
``gzip``...), about 2.9 MB of the agent's memory for the node's life (issue
#13 item 6) for what is a page of formatting here.  prometheus_client stays
the judge of the format: the tests parse this output with its parser and
compare it sample by sample with its own rendering of the same families
(tests/unit/test_exposition.py).

The families mirror the OpenMetrics model prometheus_client uses, so the
names read the same: a counter family is named without ``_total`` and its
samples with it; a histogram's samples are ``_bucket`` (with ``le``),
``_count`` and ``_sum``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = ["CONTENT_TYPE", "Counter", "Family", "Gauge", "Histogram", "Sample", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


class Family:
    """One metric family: ``name``, its help text (``documentation``), the
    names of its labels, and the samples added so far."""

    type = "untyped"
    __slots__ = ("name", "documentation", "labels", "samples")

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.samples: list[Sample] = []

    def _labels(self, values: Sequence[str]) -> dict[str, str]:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(values)} label values for labels {self.labels}")
        return dict(zip(self.labels, (str(v) for v in values), strict=True))

    def exposed_name(self) -> str:
        """The name in ``# HELP`` and ``# TYPE``."""
        return self.name


class Counter(Family):
    """A counter; ``name`` may end in ``_total`` (dropped from the family's
    name, as prometheus_client does, and put back on its samples)."""

    type = "counter"
    __slots__ = ()

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labels)

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name + "_total", self._labels(values), value))

    def exposed_name(self) -> str:
        return self.name + "_total"


class Gauge(Family):
    type = "gauge"
    __slots__ = ()

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, self._labels(values), value))


class Histogram(Family):
    """A histogram: ``add_metric(values, buckets, sum_value)`` with
    ``buckets`` the cumulative ``(le, count)`` pairs, the last one ``+Inf``
    (its count is the series' ``_count``)."""

    type = "histogram"
    __slots__ = ()

    def add_metric(
        self, values: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float
    ) -> None:
        if not buckets or buckets[-1][0] != "+Inf":
            raise ValueError(f"{self.name}: the last bucket must be +Inf")
        labels = self._labels(values)
        for le, count in buckets:
            self.samples.append(Sample(self.name + "_bucket", {**labels, "le": le}, count))
        self.samples.append(Sample(self.name + "_count", labels, buckets[-1][1]))
        self.samples.append(Sample(self.name + "_sum", labels, sum_value))


def _value(v: float) -> str:
    # Prometheus keeps every value as a float64: an integer past 2**53 is
    # written as the float it becomes there, as prometheus_client writes it.
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(s: Sample) -> str:
    if not s.labels:
        return f"{s.name} {_value(s.value)}\n"
    labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in s.labels.items())
    return f"{s.name}{{{labels}}} {_value(s.value)}\n"


def render(families: Iterable[Family]) -> bytes:
    """The families in the text format: for each, ``# HELP`` and ``# TYPE``
    lines, then one line per sample."""
    out: list[str] = []
    for f in families:
        name = f.exposed_name()
        doc = f.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {f.type}\n")
        out.extend(_line(s) for s in f.samples)
    return "".join(out).encode()
