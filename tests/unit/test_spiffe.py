"""SPIFFE ID parsing: table tests per the spec, then Hypothesis."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, strategies as st

from agent.identity.spiffe import (
    MAX_ID_BYTES, SpiffeId, SpiffeIdError, parse_spiffe_id, workload_id,
)

VALID = [
    "spiffe://example.org",
    "spiffe://cluster.local/ns/default/sa/web",
    "spiffe://a/b",
    "spiffe://under_score-dash.9/Seg.With-Mixed_Case/x",
    "spiffe://td/...",                       # three dots is an ordinary segment
    "spiffe://td/.hidden/a..b",
    "spiffe://" + "a" * 255,
    "spiffe://td/" + "x" * (MAX_ID_BYTES - len("spiffe://td/")),   # exactly 2048 bytes
]

INVALID = [
    # (id, words the message must contain)
    ("spiffe://td/a/../b", "'..'"),
    ("spiffe://td/a/./b", "'.'"),
    ("spiffe://td/a//b", "empty segment"),
    ("spiffe://td/a/", "end with '/'"),
    ("spiffe://td/", "end with '/'"),
    ("spiffe://Example.org/a", "uppercase"),
    ("spiffe://td:8443/a", "port"),
    ("spiffe://td:/a", "port"),
    ("spiffe://user@td/a", "userinfo"),
    ("spiffe://user:pw@td/a", "userinfo"),
    ("spiffe://td/a?b=1", "query"),
    ("spiffe://td?b=1", "query"),
    ("spiffe://td/a#frag", "fragment"),
    ("spiffe://td#frag", "fragment"),
    ("spiffe://td/a%20b", "percent-encoding"),
    ("spiffe://t%41d/a", "percent-encoding"),
    ("spiffe://td/" + "x" * (MAX_ID_BYTES - len("spiffe://td/") + 1), "2049 bytes"),
    ("spiffe://" + "a" * 256, "256 characters"),
    ("https://td/a", "'spiffe' scheme"),
    ("SPIFFE://td/a", "lowercase 'spiffe'"),
    ("Spiffe://td/a", "lowercase 'spiffe'"),
    ("spiffe:td/a", "must start with"),
    ("spiffe:///a", "trust domain is empty"),
    ("spiffe://", "trust domain is empty"),
    ("", "must start with"),
    ("spiffe://td/a b", "character ' '"),
    ("spiffe://td/é", "character 'é'"),
    ("spiffe://t~d/a", "character '~'"),
    ("spiffe://td/a\x00", "character '\\x00'"),
    ("spiffe://td/x" + "é" * 1020, "bytes long"),      # < 2048 chars, > 2048 bytes
]


@pytest.mark.parametrize("s", VALID)
def test_valid_ids_parse_and_round_trip(s):
    sid = parse_spiffe_id(s)
    assert str(sid) == s
    assert s == f"spiffe://{sid.trust_domain}{sid.path}"


@pytest.mark.parametrize("s,words", INVALID, ids=[repr(s[:40]) for s, _ in INVALID])
def test_invalid_ids_are_refused_with_a_message_naming_the_rule(s, words):
    with pytest.raises(SpiffeIdError) as ei:
        parse_spiffe_id(s)
    assert words in str(ei.value)


def test_error_is_a_value_error_and_wrong_type_is_a_type_error():
    assert issubclass(SpiffeIdError, ValueError)
    with pytest.raises(TypeError):
        parse_spiffe_id(b"spiffe://td/a")  # type: ignore[arg-type]


def test_components_are_split_exactly():
    sid = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/web")
    assert sid == SpiffeId("cluster.local", "/ns/default/sa/web")
    assert sid.namespace == "default" and sid.service_account == "web"
    assert sid.trust_domain_id() == SpiffeId("cluster.local", "")
    assert parse_spiffe_id("spiffe://td").path == ""


@pytest.mark.parametrize("s", [
    "spiffe://td", "spiffe://td/ns/a", "spiffe://td/ns/a/sa", "spiffe://td/ns/a/sa/b/c",
    "spiffe://td/x/a/sa/b", "spiffe://td/ns/a/xx/b",
])
def test_namespace_and_service_account_only_for_the_workload_shape(s):
    sid = parse_spiffe_id(s)
    assert sid.namespace is None and sid.service_account is None


def test_construction_validates_too():
    with pytest.raises(SpiffeIdError):
        SpiffeId("Upper", "")
    with pytest.raises(SpiffeIdError):
        SpiffeId("td", "no-leading-slash")
    with pytest.raises(SpiffeIdError):
        SpiffeId("td", "/a/")
    with pytest.raises(SpiffeIdError):
        SpiffeId("td", "/" + "x" * MAX_ID_BYTES)


def test_workload_id():
    sid = workload_id("cluster.local", "default", "web")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/web"
    assert (sid.namespace, sid.service_account) == ("default", "web")
    for ns, sa in [("", "web"), ("a/b", "web"), ("default", ".."), ("default", "w b")]:
        with pytest.raises(SpiffeIdError):
            workload_id("cluster.local", ns, sa)
    with pytest.raises(SpiffeIdError, match="uppercase"):
        workload_id("Cluster.local", "default", "web")


# --- Hypothesis --------------------------------------------------------------

_td = st.text(alphabet=string.ascii_lowercase + string.digits + ".-_", min_size=1, max_size=255)
_seg = st.text(alphabet=string.ascii_letters + string.digits + ".-_", min_size=1, max_size=40).filter(
    lambda s: s not in (".", ".."))
_valid = st.builds(lambda td, segs: "spiffe://" + td + "".join("/" + s for s in segs),
                   _td, st.lists(_seg, max_size=30)).filter(lambda s: len(s) <= MAX_ID_BYTES)
# Strings near the grammar find more edge cases than arbitrary text does.
_uri_chars = string.ascii_letters + string.digits + ".-_/:@?#%~ " + "é\x00"
_nearly = st.one_of(
    st.text(),
    st.builds(lambda t: "spiffe://" + t, st.text(alphabet=_uri_chars)),
    st.builds(lambda a, b: a + b, _valid, st.text(alphabet=_uri_chars, max_size=5)),
    st.builds(lambda t: "spiffe://" + t, st.text()),
)


@given(_valid)
def test_generated_valid_ids_always_parse(s):
    sid = parse_spiffe_id(s)
    assert str(sid) == s
    assert parse_spiffe_id(str(sid)) == sid


@given(_nearly)
def test_any_string_round_trips_or_raises_spiffe_id_error(s):
    try:
        sid = parse_spiffe_id(s)
    except SpiffeIdError:
        return
    assert str(sid) == s
    assert len(s.encode()) <= MAX_ID_BYTES
