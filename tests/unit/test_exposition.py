"""The agent's own Prometheus text exposition (agent/observe/exposition.py),
judged by prometheus_client: what it renders parses with prometheus_client's
parser to the same families, types, help texts and samples as
prometheus_client's own rendering (``generate_latest``) of the same data,
including the escapes, big integers and the special float values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from agent.observe.exposition import Counter, Gauge, Histogram, render


def reference(families) -> str:
    """prometheus_client's rendering of the same families and samples."""

    class Collector:
        def collect(self):
            for f in families:
                m = Metric(f.name, f.documentation, f.type)
                for s in f.samples:
                    m.add_sample(s.name, dict(s.labels), s.value)
                yield m

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector())
    return generate_latest(reg).decode()


def parsed(text: str) -> list:
    def value(v):
        return "NaN" if math.isnan(v) else v

    return [
        (f.name, f.type, f.documentation, [(s.name, s.labels, value(s.value)) for s in f.samples])
        for f in text_string_to_metric_families(text)
    ]


def sample_families():
    c = Counter("meshlet_things_total", 'Things, "quoted", a \\ and a\nnewline.', labels=["kind", "where"])
    c.add_metric(["a", "node1"], 3)
    c.add_metric(['q"uote', "back\\slash"], 2**60 + 1)  # past a float's 53 bits: written as that float
    c.add_metric(["new\nline", "ünïcode"], 0)
    g = Gauge("meshlet_level", "A level.")
    g.add_metric([], -1.5)
    g2 = Gauge("meshlet_odd_values", "Special values.", labels=["v"])
    for name, v in (("inf", math.inf), ("-inf", -math.inf), ("nan", math.nan), ("tiny", 1e-7), ("big", 1e21)):
        g2.add_metric([name], v)
    h = Histogram("istio_request_duration_milliseconds", "Durations.", labels=["reporter"])
    h.add_metric(["source"], [("0.5", 0), ("1", 2), ("5", 3), ("+Inf", 4)], 12.25)
    h.add_metric(["destination"], [("0.5", 1), ("+Inf", 1)], 0.1)
    return [c, g, g2, h]


def test_the_rendering_parses_as_prometheus_clients_own_does():
    fams = sample_families()
    ours = render(fams).decode()
    assert parsed(ours) == parsed(reference(fams))
    got = {f[0]: f for f in parsed(ours)}
    assert (
        got["meshlet_things"][1] == "counter" and got["istio_request_duration_milliseconds"][1] == "histogram"
    )
    things = {tuple(s[1].values()): s[2] for s in got["meshlet_things"][3]}
    assert things[('q"uote', "back\\slash")] == float(2**60 + 1) and things[("new\nline", "ünïcode")] == 0


def test_the_text_format_line_by_line():
    c = Counter("x_total", "Help with \\ and\nline.", labels=["a"])
    c.add_metric(['v"1'], 7)
    h = Histogram("h", "H.")
    h.add_metric([], [("1", 1), ("+Inf", 2)], 2.5)
    assert render([c, h]).decode() == (
        "# HELP x_total Help with \\\\ and\\nline.\n"
        "# TYPE x_total counter\n"
        'x_total{a="v\\"1"} 7.0\n'
        "# HELP h H.\n"
        "# TYPE h histogram\n"
        'h_bucket{le="1"} 1.0\n'
        'h_bucket{le="+Inf"} 2.0\n'
        "h_count 2.0\n"
        "h_sum 2.5\n"
    )


def test_a_family_is_named_as_prometheus_client_names_it():
    assert Counter("a_total", "").name == "a" and Counter("b", "").name == "b"
    assert Gauge("g_total", "").name == "g_total"


def test_misused_families_are_refused():
    with pytest.raises(ValueError, match="label values"):
        Counter("c", "", labels=["a", "b"]).add_metric(["only one"], 1)
    with pytest.raises(ValueError, match=r"\+Inf"):
        Histogram("h", "").add_metric([], [("1", 1)], 1.0)


label_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            label_text,
            st.one_of(
                st.integers(min_value=0, max_value=2**70),
                st.floats(allow_nan=False, allow_infinity=True),
            ),
        ),
        max_size=6,
        unique_by=lambda r: r[0],
    ),
    doc=label_text,
)
def test_any_label_values_and_numbers_read_back_as_prometheus_client_reads_its_own(rows, doc):
    g = Gauge("meshlet_any", doc, labels=["v"])
    c = Counter("meshlet_any_count_total", doc, labels=["v"])
    for lv, value in rows:
        g.add_metric([lv], value)
        c.add_metric([lv], abs(value))
    assert parsed(render([g, c]).decode()) == parsed(reference([g, c]))
