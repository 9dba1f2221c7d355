"""agent/policy/http.py: request-target normalization, hosts, framing; the
bypass corpus against a `deny prefix /admin` rule; Hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.http import (
    HttpError, NormalizedPath, check_framing, header_multimap, normalize_host, normalize_path,
    path_pattern_problem,
)
from agent.policy import http as policy_http
from agent.policy.model import StringMatch

DENY_ADMIN = StringMatch.parse("/admin*")


def status(raw, **kw):
    with pytest.raises(HttpError) as ei:
        normalize_path(raw, **kw)
    return ei.value.status


# -- the table -----------------------------------------------------------------

@pytest.mark.parametrize("raw, path, query", [
    ("/", "/", None),
    ("/a/b", "/a/b", None),
    ("/a/./b", "/a/b", None),
    ("/a/../b", "/b", None),
    ("/../../b", "/b", None),             # never above the root
    ("/a/b/..", "/a/", None),
    ("/a/.", "/a/", None),
    ("/a//b///c", "/a/b/c", None),
    ("/%7e%41%2d%2E%5f", "/~A-._", None),  # unreserved escapes decoded
    ("/%e2%82%ac", "/%E2%82%AC", None),     # other escapes kept, hex upper-cased
    ("/x%25y", "/x%25y", None),             # an escaped '%' is never decoded
    ("/a|b", "/a%7Cb", None),               # characters RFC 3986 forbids are escaped
    ("/p?q=1&r=/../x", "/p", "q=1&r=/../x"),  # the query is not normalized as a path
    ("/p?", "/p", ""),
])
def test_normalize_table(raw, path, query):
    n = normalize_path(raw)
    assert (n.path, n.query) == (path, query)
    assert n.target == path + ("" if query is None else "?" + query)


@pytest.mark.parametrize("raw, code", [
    ("", 400), ("admin", 400), ("*", 400), ("http://h/x", 400), ("/a#b", 400),
    ("/a b", 400), ("/a\tb", 400), ("/a\x00", 400), ("/a\x7f", 400), ("/é", 400),
    (b"/\xc3\xa9", 400), ("/%4", 400), ("/%zz", 400), ("/%00", 400), ("/%0d%0a", 400),
    ("/%c0%ae", 400), ("/%e2%82", 400), ("/..;/x", 400), ("/.;x/y", 400), ("/%2e%2e;/x", 400),
    ("/a%2Fb", 400), ("/a%5cb", 400), ("/a\\b", 400), ("/" + "a" * 9000, 414),
])
def test_normalize_refuses(raw, code):
    assert status(raw) == code


def test_merge_slashes_can_be_turned_off():
    assert normalize_path("/a//b", merge_slashes=False).path == "/a//b"
    assert normalize_path("//a/../b", merge_slashes=False).path == "//b"


@pytest.mark.parametrize("raw, keep, decode", [
    ("/a%2Fb", "/a%2Fb", "/a/b"),
    ("/a%2fb", "/a%2Fb", "/a/b"),
    ("/a%5Cb", "/a%5Cb", "/a/b"),
    ("/a\\b", "/a%5Cb", "/a/b"),
    ("/x%2F..%2Fadmin", "/x%2F..%2Fadmin", "/admin"),
    ("/x\\..\\admin", "/x%5C..%5Cadmin", "/admin"),
])
def test_escaped_slash_settings(raw, keep, decode):
    assert status(raw) == 400
    assert normalize_path(raw, escaped_slash="keep").path == keep
    assert normalize_path(raw, escaped_slash="decode_and_merge").path == decode


def test_bytes_and_bad_settings():
    assert normalize_path(b"/a/./b?x").target == "/a/b?x"
    with pytest.raises(ValueError):
        normalize_path("/", escaped_slash="sometimes")  # a programming error, not a request error


# -- the bypass corpus: each case is caught by `deny /admin*` or refused ----------

# (raw target, what happens with the defaults): "deny" = normalizes to a path the
# prefix rule matches; an int = refused with that status; "miss" = deliberately
# not matched (documented).
BYPASS = [
    ("/admin", "deny"),
    ("/admin/", "deny"),
    ("/admin/users", "deny"),
    ("/./admin", "deny"),
    ("//admin", "deny"),
    ("///admin//x", "deny"),
    ("/foo/../admin", "deny"),
    ("/foo/bar/../../admin", "deny"),
    ("/../admin", "deny"),
    ("/%61dmin", "deny"),
    ("/%61%64%6D%69%6E", "deny"),
    ("/%2e/admin", "deny"),
    ("/%2e%2e/admin", "deny"),
    ("/foo/%2E%2E/admin", "deny"),
    ("/admin;x", 400),               # path parameters: refused by default (servlets strip them)
    ("/admin;x=y", 400),
    ("/admin;/", 400),
    ("/admin;jsessionid=1/users", 400),
    ("/ad;x=y/../admin", 400),
    ("/admin%3Bx", 400),             # escaped too
    ("/admin%3b/", 400),
    ("/admin?a;b", "deny"),          # a ';' in the query is the query's business
    ("/admin?x", "deny"),            # the query is not part of the path
    ("/admin?/../public", "deny"),
    ("/admin%2F", 400),              # escaped slash: refused by default
    ("/admin%2fx", 400),
    ("/public%2F..%2Fadmin", 400),
    ("/admin%5C", 400),
    ("\\admin", 400),
    ("/public\\..\\admin", 400),     # backslash: refused by default
    ("/admin#x", 400),               # fragments never belong in a request
    ("/public#/../admin", 400),
    ("/%00admin", 400),
    ("/admin%00.html", 400),
    ("/admin\x00", 400),
    ("/%c0%ae%c0%ae/admin", 400),    # overlong UTF-8 for '.'
    ("/public/%c0%afadmin", 400),    # overlong UTF-8 for '/'
    ("/public/..;/admin", 400),      # servlet-style dot segment with parameters
    ("/admin\r\n", 400),
    ("/Admin", "miss"),              # paths are case-sensitive, as in Istio
    ("/ADMIN", "miss"),
]


@pytest.mark.parametrize("raw, outcome", BYPASS)
def test_bypass_corpus(raw, outcome):
    if isinstance(outcome, int):
        assert status(raw) == outcome
        return
    n = normalize_path(raw)
    assert DENY_ADMIN.matches(n.path) is (outcome == "deny"), n.path


# -- path parameters (issue #12 item 9): the three settings against `deny /admin` and `deny /admin/*`,
# as a servlet-style backend (which strips parameters before routing) would see them.

DENY_EXACT = StringMatch.parse("/admin")
DENY_UNDER = StringMatch.parse("/admin/*")
PARAMS = ["/admin;x=y", "/admin;/", "/admin;", "/admin;x=y/", "/admin/;x/users", "/admin/users;x=1",
          "/ad;x=y/../admin", "/public/..;x/admin", "/a;b/../admin;c"]


def servlet_path(raw: str) -> str:
    """What Tomcat/Spring route: each segment's ';...' removed, slashes merged, dot segments resolved."""
    import re
    return policy_http._remove_dot_segments(re.sub(r"/{2,}", "/", re.sub(r";[^/]*", "", raw)))


@pytest.mark.parametrize("raw", PARAMS)
def test_path_parameters_reject_refuses_every_variant(raw):
    assert status(raw) == 400  # the default
    assert status(raw, path_parameters="reject") == 400


@pytest.mark.parametrize("raw", PARAMS)
def test_path_parameters_strip_matches_what_a_servlet_routes(raw):
    n = normalize_path(raw, path_parameters="strip")
    assert n.path == servlet_path(raw) and ";" not in n.target
    # so a deny on the servlet's path catches it, exact or under
    for rule in (DENY_EXACT, DENY_UNDER):
        assert rule.matches(n.path) is rule.matches(servlet_path(raw)), (rule, n.path)


def test_path_parameters_strip_keeps_an_escaped_semicolon_as_data():
    assert normalize_path("/admin%3bx", path_parameters="strip").path == "/admin%3Bx"
    assert normalize_path("/admin;a%3Bb/c", path_parameters="strip").path == "/admin/c"


def test_path_parameters_keep_is_the_old_forwarding():
    assert normalize_path("/a;x=1/b", path_parameters="keep").path == "/a;x=1/b"
    assert not DENY_EXACT.matches(normalize_path("/admin;x=y", path_parameters="keep").path)  # documented
    assert status("/public/..;/admin", path_parameters="keep") == 400  # a servlet dot segment


def test_path_parameters_process_default(monkeypatch):
    monkeypatch.setattr(policy_http, "_default_path_parameters", "reject")
    policy_http.set_default_path_parameters("strip")
    assert normalize_path(b"/admin;x=y").path == "/admin"
    assert status("/admin;x=y", path_parameters="reject") == 400  # an explicit argument wins
    policy_http.set_default_path_parameters("reject")
    assert status(b"/admin;x=y") == 400
    with pytest.raises(ValueError):
        policy_http.set_default_path_parameters("drop")


# -- Hypothesis -------------------------------------------------------------------

_ALPHABET = st.sampled_from(list("/./..//a%2e%2E%2f%5C%41%00%c0%ae;?#\\ Ab~|%e2%82%ac%25") + ["..", "/..", "%", "%2"])
targets = st.one_of(
    st.lists(_ALPHABET, max_size=30).map(lambda xs: "/" + "".join(xs)),
    st.text(max_size=60),
    st.binary(max_size=60),
)
SETTINGS = st.fixed_dictionaries({
    "merge_slashes": st.booleans(),
    "escaped_slash": st.sampled_from(["reject", "keep", "decode_and_merge"]),
    "path_parameters": st.sampled_from(["reject", "strip", "keep"]),
})


@settings(max_examples=1500, deadline=None)
@given(targets, SETTINGS)
def test_normalize_only_raises_http_error_and_is_idempotent(raw, kw):
    try:
        n = normalize_path(raw, **kw)
    except HttpError as e:
        assert e.status in (400, 414)
        return
    assert isinstance(n, NormalizedPath)
    again = normalize_path(n.target, **kw)
    assert again == n
    segs = n.path.split("/")
    assert n.path.startswith("/")
    assert "." not in segs and ".." not in segs
    assert "?" not in n.path and "#" not in n.path and "\\" not in n.path
    assert all(0x21 <= ord(c) <= 0x7E for c in n.target)
    if kw["merge_slashes"]:
        assert "//" not in n.path
    if kw["escaped_slash"] != "keep":
        assert "%2F" not in n.path and "%5C" not in n.path
    if kw["path_parameters"] != "keep":
        assert ";" not in n.path
    if kw["path_parameters"] == "reject":
        assert "%3B" not in n.path


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", "c;d"]), max_size=8))
def test_dot_segments_are_resolved_like_a_stack(segments):
    raw = "/" + "/".join(segments)
    try:
        n = normalize_path(raw, merge_slashes=True)
    except HttpError:
        return
    stack: list[str] = []
    real = [s.replace("%2e", ".").replace("%2E", ".") for s in segments if s != ""]
    for s in real:
        if s == "..":
            if stack:
                stack.pop()
        elif s != ".":
            stack.append(s)
    expected = "/" + "/".join(stack)
    trailing = bool(segments) and (segments[-1] in ("", ".", "..", "%2e", "%2E%2e")) and stack
    assert n.path in (expected, expected + "/") and (n.path.endswith("/") or not trailing)


# -- path patterns (used by the loader) ---------------------------------------------

@pytest.mark.parametrize("literal, kind, ok", [
    ("/admin", "exact", True), ("/api/", "prefix", True), ("/a;b", "exact", True),
    ("/a%2Fb", "exact", True), (".php", "suffix", True),
    ("/a/../b", "exact", False), ("//a", "prefix", False), ("/%61", "exact", False),
    ("/%2f", "exact", False), ("/a?b", "exact", False), ("a", "exact", False),
    ("/a\\b", "exact", False), ("/a/.", "exact", False), ("/a/.", "prefix", True),
])
def test_path_pattern_problem(literal, kind, ok):
    assert (path_pattern_problem(literal, kind) is None) is ok


# -- hosts --------------------------------------------------------------------------

@pytest.mark.parametrize("raw, default_port, want", [
    ("Example.COM", 80, "example.com"),
    ("example.com:80", 80, "example.com"),
    ("example.com:", 80, "example.com"),
    ("example.com.", 80, "example.com"),
    ("example.com:8080", 80, "example.com:8080"),
    ("example.com:443", 443, "example.com"),
    ("example.com:0080", 80, "example.com"),
    ("[FD00:0::1]:80", 80, "[fd00::1]"),
    ("[fd00::1]:8443", 80, "[fd00::1]:8443"),
    ("10.0.0.1:80", 80, "10.0.0.1"),
    (b"API.local", 80, "api.local"),
])
def test_normalize_host(raw, default_port, want):
    assert normalize_host(raw, default_port) == want


@pytest.mark.parametrize("raw", ["", "a b", "user@host", "a:b:c", "host:99999", "host:x",
                                 "[fd00::1", "[nope]", "[fd00::1]x", "h\x00", ".", "..", "a..", ".a", "a..b", "é.com",
                                 "host/path", "[fe80::1%eth0]"])
def test_normalize_host_refuses(raw):
    with pytest.raises(HttpError) as ei:
        normalize_host(raw)
    assert ei.value.status == 400


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=30), st.binary(max_size=30)))
def test_normalize_host_only_raises_http_error_and_is_idempotent(raw):
    try:
        h = normalize_host(raw)
    except HttpError:
        return
    assert normalize_host(h) == h and h == h.lower()


# -- framing ------------------------------------------------------------------------

H = [(b"Host", b"example.com")]


@pytest.mark.parametrize("headers, version, want", [
    (H, "1.1", (b"example.com", None, False)),
    (H + [(b"Content-Length", b"12")], "1.1", (b"example.com", 12, False)),
    (H + [(b"Content-Length", b"12"), (b"content-length", b" 12 ")], "1.1", (b"example.com", 12, False)),
    (H + [(b"Content-Length", b"12, 12")], "1.1", (b"example.com", 12, False)),
    (H + [(b"Transfer-Encoding", b"Chunked")], "1.1", (b"example.com", None, True)),
    ([], "1.0", (None, None, False)),
    ([(b"Content-Length", b"0")], b"1.0", (None, 0, False)),
])
def test_framing_ok(headers, version, want):
    r = check_framing(headers, version)
    assert (r.host, r.content_length, r.chunked) == want


@pytest.mark.parametrize("headers, version, code", [
    ([], "1.1", 400),                                                     # no Host
    (H + H, "1.1", 400),                                                  # two Hosts
    (H + [(b"host", b"other")], "1.0", 400),
    (H + [(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")], "1.1", 400),
    (H + [(b"Content-Length", b"1"), (b"Content-Length", b"2")], "1.1", 400),
    (H + [(b"Content-Length", b"1, 2")], "1.1", 400),
    (H + [(b"Content-Length", b"-1")], "1.1", 400),
    (H + [(b"Content-Length", b"")], "1.1", 400),
    (H + [(b"Content-Length", b"0x10")], "1.1", 400),
    (H + [(b"Transfer-Encoding", b"gzip, chunked")], "1.1", 400),
    (H + [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], "1.1", 400),
    (H + [(b"Transfer-Encoding", b"identity")], "1.1", 400),
    ([(b"Transfer-Encoding", b"chunked")], "1.0", 400),
    (H + [(b"Bad Name", b"x")], "1.1", 400),
    (H + [(b"X", b"a\r\nInjected: 1")], "1.1", 400),
    (H + [(b"X", b"a\x00")], "1.1", 400),
    (H + [(b"X-%d" % i, b"v") for i in range(100)], "1.1", 431),
    (H + [(b"X", b"v" * 70000)], "1.1", 431),
    (H, "2.0", 505),
])
def test_framing_refused(headers, version, code):
    with pytest.raises(HttpError) as ei:
        check_framing(headers, version)
    assert ei.value.status == code


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"X", b"bad name"]),
                          st.binary(max_size=12)), max_size=6),
       st.sampled_from(["1.0", "1.1", "0.9"]))
def test_framing_only_raises_http_error(headers, version):
    try:
        r = check_framing(headers, version)
    except HttpError as e:
        assert e.status in (400, 431, 505)
        return
    assert not (r.chunked and r.content_length is not None)


def test_header_multimap_keeps_every_line():
    m = header_multimap([(b"X-Role", b" a "), (b"x-role", b"b"), (b"Other", b"\xe9")])
    assert m == {"x-role": ("a", "b"), "other": ("é",)}


# -- fast paths agree with the reference implementations ------------------------

from agent.policy.http import scan_request_headers  # noqa: E402

_HOSTILE = st.sampled_from(
    ["/", "/", "/", ".", ".", "%", "2", "F", "f", "5", "C", "c", "e", "E", "\\", "a", "b", "?", "#", ";",
     "=", "~", "-", "_", ":", "@", "!", "&", "+", "'", "|", '"', " ", "\x00", "\x01", "\x7f", "\t",
     "\u00e9", "\u20ac", "%2F", "%2f", "%5C", "%5c", "%2e", "%2E", "%41", "%c0%ae", "%00", "%25", "..",
     "/..", "/.", "//", "%zz", "%4"])
# Mostly normal-looking targets, so that both branches of the fast path are exercised.
_PLAIN = st.sampled_from(list("abcXYZ019-._~!$&'()*+,;=:@") + ["/", "/", "/", "?", "%41", "%2f", "%e2%82%ac"])
hostile_targets = st.one_of(
    st.lists(_HOSTILE, max_size=25).map("".join),
    st.lists(_HOSTILE, max_size=25).map(lambda xs: "/" + "".join(xs)),
    st.lists(_PLAIN, max_size=25).map(lambda xs: "/" + "".join(xs)),
    st.lists(st.one_of(_PLAIN, _PLAIN, _PLAIN, _HOSTILE), max_size=25).map(lambda xs: "/" + "".join(xs)),
    # a plain path and a hostile query
    st.tuples(st.lists(_PLAIN, max_size=8), st.lists(st.one_of(_PLAIN, _HOSTILE), max_size=12)).map(
        lambda pq: "/" + "".join(pq[0]).replace("?", "") + "?" + "".join(pq[1])),
    st.text(max_size=40),
    st.binary(max_size=40),
)


def _outcome(fn, raw, **kw):
    try:
        return "ok", fn(raw, **kw)
    except HttpError as e:
        return "error", (e.status, e.reason)


@settings(max_examples=2000, deadline=None)
@given(hostile_targets, SETTINGS, st.booleans(), st.sampled_from([8192, 12]))
def test_fast_normalize_equals_the_reference(raw, kw, as_bytes, max_length):
    if as_bytes and isinstance(raw, str):
        raw = raw.encode("utf-8")
    fast = _outcome(normalize_path, raw, max_length=max_length, **kw)
    slow = _outcome(policy_http._normalize_path_slow, raw, max_length=max_length, **kw)
    assert fast == slow


@pytest.mark.parametrize("raw", ["/", "/api/v1/items/42", "/a/b.js?x=1&y=%2F%zz".replace("%zz", "%7E"),
                                 b"/index.html", "/a,b=c/d:e@f", "/?", "/p?a;b"])
def test_plain_targets_take_the_fast_path(raw, monkeypatch):
    want = policy_http._normalize_path_slow(raw)

    def boom(*a, **k):
        raise AssertionError("slow path taken")
    monkeypatch.setattr(policy_http, "_normalize_path_slow", boom)
    assert normalize_path(raw) == want


@pytest.mark.parametrize("raw", ["/a//b", "/a/./b", "/.well-known", "/a/..", "/%41", "/a\\b", "/a b", "/a#b"])
def test_targets_needing_work_take_the_slow_path(raw, monkeypatch):
    calls = []
    slow = policy_http._normalize_path_slow

    def spy(*a, **k):
        calls.append(a)
        return slow(*a, **k)
    monkeypatch.setattr(policy_http, "_normalize_path_slow", spy)
    _outcome(normalize_path, raw)
    assert calls


def _check_framing_reference(headers, version, max_headers=100, max_header_bytes=64 * 1024):
    """check_framing as first written (several passes), plus header lookups as
    http1 did them: the single-pass scan must agree with it on every input."""
    import re
    token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
    bad_value = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
    v = version.decode("ascii", "replace") if isinstance(version, (bytes, bytearray)) else version
    if v not in ("1.1", "1.0"):
        raise HttpError(505, f"HTTP version {v[:16]!r} is not supported")
    if len(headers) > max_headers:
        raise HttpError(431, f"{len(headers)} header lines; at most {max_headers} are allowed")
    total = sum(len(n) + len(val) for n, val in headers)
    if total > max_header_bytes:
        raise HttpError(431, f"{total} bytes of headers; at most {max_header_bytes} are allowed")
    hosts, lengths, codings = [], [], []
    for name, value in headers:
        if not token.fullmatch(name):
            raise HttpError(400, f"invalid header name {name[:64]!r}")
        value = value.strip(b" \t")
        if bad_value.search(value):
            raise HttpError(400, f"control character in the value of header {name.decode()!r}")
        lname = name.lower()
        if lname == b"host":
            hosts.append(value)
        elif lname == b"content-length":
            lengths += [p.strip(b" \t") for p in value.split(b",")]
        elif lname == b"transfer-encoding":
            codings += [p.strip(b" \t").lower() for p in value.split(b",")]
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host header")
    if v == "1.1" and not hosts:
        raise HttpError(400, "HTTP/1.1 request without a Host header")
    if lengths and codings:
        raise HttpError(400, "both Content-Length and Transfer-Encoding (ambiguous framing)")
    content_length = None
    if lengths:
        if any(not x.isdigit() or len(x) > 18 for x in lengths):
            raise HttpError(400, "malformed Content-Length")
        if len(set(lengths)) > 1 and len({int(x) for x in lengths}) > 1:
            raise HttpError(400, "differing Content-Length values")
        content_length = int(lengths[0])
    chunked = False
    if codings:
        if v == "1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings != [b"chunked"]:
            raise HttpError(400, "unsupported Transfer-Encoding "
                                 f"{b', '.join(codings).decode('ascii', 'replace')[:64]!r}; "
                                 "only 'chunked' is accepted")
        chunked = True

    def first(lname):
        for n, val in headers:
            if n.lower() == lname:
                return val.strip(b" \t")
        return None
    return hosts[0] if hosts else None, content_length, chunked, first(b"expect"), first(b"upgrade")


_NAMES = st.sampled_from([b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding",
                          b"transfer-encoding", b"Expect", b"expect", b"Upgrade", b"upgrade", b"X", b"bad name",
                          b"", b"Host\n", b"Connection"])
_VALUES = st.one_of(
    st.sampled_from([b"", b"1", b" 12 ", b"12, 12", b"1, 2", b"chunked", b"Chunked", b" chunked ", b"gzip, chunked",
                     b"identity", b"100-continue", b"websocket", b"a\r\nb", b"a\x00", b"\t x \t", b"0x10", b"-1",
                     b"example.com", b"9" * 19, b"007"]),
    st.binary(max_size=10))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=7), st.sampled_from(["1.0", "1.1", b"1.1", b"1.0", "0.9", "2.0"]),
       st.sampled_from([(100, 65536), (3, 65536), (100, 20)]), st.booleans())
def test_single_pass_framing_equals_the_reference(headers, version, limits, counted):
    max_headers, max_bytes = limits
    kw = {}
    if counted:
        kw["header_bytes"] = sum(len(n) + len(v) for n, v in headers)
    fast = _outcome(lambda h, **k: scan_request_headers(h, version, max_headers=max_headers,
                                                        max_header_bytes=max_bytes, **k), headers, **kw)
    slow = _outcome(lambda h: _check_framing_reference(h, version, max_headers, max_bytes), headers)
    assert fast == slow
    pub = _outcome(lambda h: check_framing(h, version, max_headers=max_headers, max_header_bytes=max_bytes), headers)
    if slow[0] == "ok":
        assert pub[0] == "ok" and (pub[1].host, pub[1].content_length, pub[1].chunked) == slow[1][:3]
    else:
        assert pub == slow


def test_fast_path_cache_is_bounded_and_respects_max_length():
    raw = b"/cached/target?q=1"
    first = normalize_path(raw)
    assert normalize_path(raw) == first == policy_http._normalize_path_slow(raw)
    with pytest.raises(HttpError) as ei:  # a cached target still obeys a smaller limit
        normalize_path(raw, max_length=len(raw) - 1)
    assert ei.value.status == 414
    for i in range(policy_http._FAST_CACHE_MAX + 10):
        normalize_path(b"/c/%d" % i)
    assert len(policy_http._FAST_CACHE) <= policy_http._FAST_CACHE_MAX
    long_raw = b"/" + b"a" * policy_http._FAST_CACHE_KEY_MAX
    assert normalize_path(long_raw).path == long_raw.decode()
    assert long_raw not in policy_http._FAST_CACHE
