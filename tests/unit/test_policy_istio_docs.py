"""Istio's documented AuthorizationPolicy examples (policies/istio-docs/),
rewritten for the simulated cluster, load as `security.istio.io/v1` documents
and decide what Istio documents for them.  The unsupported ones fail closed
with an error that names the field.

Workloads (see policies/istio-docs/README.md): httpbin (foo, app=httpbin,
port 8000), clients sleep (foo) and tester (bar); node 1 pods are in
10.244.1.0/24, node 2 pods in 10.244.2.0/24.
"""

from __future__ import annotations

import ipaddress
import pathlib

import pytest

from agent.identity.spiffe import parse_spiffe_id
from agent.policy.evaluate import Request, evaluate, explain
from agent.policy.http import normalize_host, normalize_path
from agent.policy.load import ISTIO_APIS, load_policies, parse_policies
from agent.yamlsrc import SourceError

DOCS = pathlib.Path(__file__).resolve().parents[2] / "policies" / "istio-docs"
UNSUPPORTED = DOCS / "unsupported"

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
TESTER = "spiffe://cluster.local/ns/bar/sa/tester"
BLOCKED = "spiffe://cluster.local/ns/bar/sa/blocked"
OTHER = "spiffe://cluster.local/ns/baz/sa/x"
FOREIGN = "spiffe://example.org/ns/foo/sa/sleep"
NODE1_IP = "10.244.1.10"
NODE2_IP = "10.244.2.10"


def load(name: str):
    return load_policies(DOCS / name)


def req(src: str | None = SLEEP, *, ip: str | None = NODE1_IP, port: int = 8000,
        app: str = "httpbin", ns: str = "foo", method: str | None = "GET", path: str = "/",
        host: str | None = None, headers: dict | None = None) -> Request:
    """An HTTP request (method given) or a TCP connection (method None),
    normalized the way the proxy does it."""
    principal = parse_spiffe_id(src) if src else None
    addr = ipaddress.ip_address(ip) if ip else None
    if method is None:
        return Request(ns, {"app": app}, port, principal, addr)
    return Request(ns, {"app": app}, port, principal, addr, True, method,
                   normalize_path(path).path, normalize_host(host) if host else None,
                   headers or {})


def decide(name: str, r: Request) -> tuple[bool, str | None]:
    d = evaluate(load(name), r)
    return d.allowed, d.policy


# --------------------------------------------------------------------------
# The directory as a whole


def test_every_document_loads_as_istio_v1_and_the_set_is_consistent():
    files = sorted(DOCS.glob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        ps = load_policies(f)
        assert len(ps) >= 1, f
        assert {p.api_version for p in ps.policies} == {"security.istio.io/v1"}, f
    everything = load_policies(DOCS)   # names are unique across the directory
    assert len(everything) == sum(len(load_policies(f)) for f in files)
    assert "security.istio.io/v1" in ISTIO_APIS


def test_v1beta1_documents_mean_the_same():
    for f in sorted(DOCS.glob("*.yaml")):
        text = f.read_text()
        beta = text.replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n")
        assert beta != text
        assert parse_policies(beta, f.name).version == load_policies(f).version, f.name


# --------------------------------------------------------------------------
# One example at a time


def test_allow_nothing():
    for r in (req(), req(TESTER, method=None), req(None, path="/x"),
              req(app="sleep", port=80)):
        assert decide("01-allow-nothing.yaml", r) == (False, None)
    # other namespaces are untouched
    assert decide("01-allow-nothing.yaml", req(ns="bar")) == (True, None)


def test_deny_all_wins_over_allow_all():
    ps = load_policies([DOCS / "02-deny-all.yaml", DOCS / "03-allow-all.yaml"])
    for r in (req(), req(None, method=None), req(TESTER, path="/status")):
        d = evaluate(ps, r)
        assert (d.allowed, d.policy, d.action) == (False, "foo/deny-all", "DENY")


def test_allow_all_overrides_allow_nothing():
    ps = load_policies([DOCS / "01-allow-nothing.yaml", DOCS / "03-allow-all.yaml"])
    for r in (req(), req(None, method=None, ip=None), req(OTHER, method="DELETE", path="/x")):
        d = evaluate(ps, r)
        assert (d.allowed, d.policy) == (True, "foo/allow-all")


@pytest.mark.parametrize("r, allowed", [
    (req(SLEEP), True),
    (req(SLEEP, method=None, port=9999), True),           # any port, TCP too
    (req(SLEEP, method="DELETE", path="/anything"), True),
    (req(TESTER), False),
    (req(FOREIGN), False),                                  # same path, other trust domain
    (req(None), False),                                     # plaintext peer: no principal
    (req("spiffe://cluster.local/ns/foo/sa/sleep2"), False),
])
def test_allow_by_principal(r, allowed):
    assert decide("04-allow-by-principal.yaml", r) == (
        allowed, "foo/httpbin-from-sleep" if allowed else None)
    # other workloads of foo have no ALLOW policy
    assert decide("04-allow-by-principal.yaml", req(TESTER, app="sleep"))[0] is True


@pytest.mark.parametrize("r, allowed", [
    (req(TESTER), True),
    (req(BLOCKED, method=None), True),
    (req(SLEEP), False),
    (req(None), False),
    (req(OTHER), False),
])
def test_allow_by_namespace(r, allowed):
    assert decide("05-allow-by-namespace.yaml", r)[0] is allowed


@pytest.mark.parametrize("r, allowed", [
    (req(SLEEP, path="/info"), True),
    (req(SLEEP, path="/info/x?y=1"), True),
    (req(SLEEP, path="/infox"), True),                      # prefix "/info*" is a string prefix
    (req(TESTER, path="/info"), True),                      # second source: namespace bar
    (req(SLEEP, method="POST", path="/data"), True),
    (req(SLEEP, method="POST", path="/data/"), False),      # exact
    (req(SLEEP, method="POST", path="/info"), False),       # method and path pair up per operation
    (req(SLEEP, method="GET", path="/data"), False),
    (req(SLEEP, method="get", path="/info"), False),        # methods are case-sensitive
    (req(SLEEP, path="/INFO"), False),                      # paths are case-sensitive
    (req(OTHER, path="/info"), False),
    (req(SLEEP, method=None), False),                       # TCP: the HTTP-only ALLOW is ignored
])
def test_allow_by_method_and_path(r, allowed):
    assert decide("06-allow-method-path.yaml", r)[0] is allowed


def test_allow_by_method_and_path_explains_ignored_rules_on_tcp():
    d, traces = explain(load("06-allow-method-path.yaml"), req(SLEEP, method=None))
    assert d.action == "NO_MATCH" and "ignored" in d.reason
    assert [t.outcome for t in traces] == ["ignored"]


@pytest.mark.parametrize("path, denied", [
    ("/admin", True), ("/admin/", True), ("/admin/users", True), ("/./admin", True),
    ("/x/../admin/y", True), ("//admin", True), ("/%61dmin", True), ("/admin?x=1", True),
    ("/administrator", False),      # "/admin/*" is not "/admin*"
    ("/Admin", False), ("/", False), ("/x/admin", False),
])
def test_deny_path_prefix(path, denied):
    allowed, policy = decide("07-deny-path-prefix.yaml", req(OTHER, path=path))
    assert allowed is not denied
    assert policy == ("foo/httpbin-deny-admin" if denied else None)


def test_deny_path_prefix_on_tcp_denies_the_connection():
    # Istio's TCP semantics: the path is dropped from a DENY rule on a
    # non-HTTP connection, so the whole connection is refused.
    assert decide("07-deny-path-prefix.yaml", req(SLEEP, method=None)) == (False, "foo/httpbin-deny-admin")


@pytest.mark.parametrize("r, allowed", [
    (req(SLEEP), True),
    (req("spiffe://cluster.local/ns/foo/sa/other", method=None), True),
    (req(TESTER), False),
    (req(None), False),                                     # no identity, so no namespace: denied
    (req(TESTER, ns="bar"), True),                          # the policy lives in foo
])
def test_deny_not_from_namespace(r, allowed):
    assert decide("08-deny-not-from-namespace.yaml", r)[0] is allowed


@pytest.mark.parametrize("ip, allowed", [
    (NODE1_IP, True), ("10.244.1.254", True), (NODE2_IP, False), ("fd00:244:1::10", False),
    (None, False),
])
def test_allow_ip_blocks(ip, allowed):
    assert decide("09-allow-ip-blocks.yaml", req(OTHER, ip=ip))[0] is allowed
    assert decide("09-allow-ip-blocks.yaml", req(None, ip=ip, method=None))[0] is allowed


@pytest.mark.parametrize("ip, allowed", [
    (NODE1_IP, True), (NODE2_IP, False), ("10.244.2.99", True), (None, True),
])
def test_deny_ip_blocks_with_an_exception(ip, allowed):
    assert decide("10-deny-ip-blocks.yaml", req(SLEEP, ip=ip))[0] is allowed


@pytest.mark.parametrize("method, path, allowed, policy", [
    ("GET", "/x", True, "foo/httpbin-not-private"),
    ("HEAD", "/x", True, "foo/httpbin-not-private"),
    ("DELETE", "/x", False, "foo/httpbin-read-only"),
    ("get", "/x", False, "foo/httpbin-read-only"),          # case-sensitive: "get" is not GET
    ("GET", "/private", False, None),
    ("GET", "/private/key", False, None),
    ("GET", "/privately", True, "foo/httpbin-not-private"),
    ("DELETE", "/private", False, "foo/httpbin-read-only"),
])
def test_not_methods_and_not_paths(method, path, allowed, policy):
    assert decide("11-not-methods-not-paths.yaml", req(OTHER, method=method, path=path)) == (allowed, policy)


def test_not_methods_on_tcp():
    # The DENY rule's notMethods is dropped on TCP, so it matches every
    # connection; the ALLOW rule with notPaths is ignored.
    assert decide("11-not-methods-not-paths.yaml", req(SLEEP, method=None)) == (False, "foo/httpbin-read-only")


def test_audit_never_decides():
    ps = load("12-audit.yaml")
    d = evaluate(ps, req(OTHER, path="/user-profile/7"))
    assert d.allowed and d.action == "NO_POLICY"
    assert [(a.policy, a.rule) for a in d.audited] == [("foo/httpbin-audit-profiles", 0)]
    assert evaluate(ps, req(OTHER, method="POST", path="/user-profile/7")).audited == ()
    assert evaluate(ps, req(OTHER, path="/other")).audited == ()
    # with deny-all the AUDIT match is still reported, and the request is denied
    both = load_policies([DOCS / "12-audit.yaml", DOCS / "02-deny-all.yaml"])
    d = evaluate(both, req(OTHER, path="/user-profile"))
    assert not d.allowed and [a.policy for a in d.audited] == ["foo/httpbin-audit-profiles"]


@pytest.mark.parametrize("method, path, headers, allowed, policy", [
    ("GET", "/ip", {"x-token": ["admin"]}, True, "foo/httpbin-ip-for-tokens"),
    ("GET", "/ip", {"X-Token": ["ops-7"]}, True, "foo/httpbin-ip-for-tokens"),
    ("GET", "/ip", {}, False, "foo/httpbin-deny-without-token"),
    ("GET", "/ip", {"x-token": ["guest"]}, False, "foo/httpbin-deny-without-token"),
    ("GET", "/ip", {"x-token": ["Admin"]}, False, "foo/httpbin-deny-without-token"),  # values are case-sensitive
    # repeated header: notValues holds only if NO line matches, values if ANY does
    ("GET", "/ip", {"x-token": ["guest", "admin"]}, True, "foo/httpbin-ip-for-tokens"),
    ("GET", "/ip", {"x-token": ["admin", "guest"]}, True, "foo/httpbin-ip-for-tokens"),
    ("GET", "/other", {"x-token": ["admin"]}, False, None),
    ("POST", "/ip", {}, False, None),                       # not denied (GET only), not allowed
])
def test_header_conditions(method, path, headers, allowed, policy):
    r = req(OTHER, method=method, path=path, headers=headers)
    assert decide("13-header-conditions.yaml", r) == (allowed, policy)


def test_header_conditions_on_tcp():
    # DENY drops the header condition and the method: every TCP connection is denied
    assert decide("13-header-conditions.yaml", req(OTHER, method=None)) == (False, "foo/httpbin-deny-without-token")


@pytest.mark.parametrize("src, ip, port, allowed", [
    (TESTER, NODE1_IP, 8000, True),
    (TESTER, NODE2_IP, 8000, False),
    (TESTER, NODE1_IP, 8001, False),
    (BLOCKED, NODE1_IP, 8000, False),
    (SLEEP, NODE1_IP, 8000, False),
    (None, NODE1_IP, 8000, False),
])
def test_when_conditions(src, ip, port, allowed):
    for method in ("GET", None):   # no HTTP-only key: the same on TCP
        assert decide("14-when-conditions.yaml", req(src, ip=ip, port=port, method=method))[0] is allowed


@pytest.mark.parametrize("host, allowed", [
    ("httpbin.foo", True), ("HTTPBIN.Foo", True), ("httpbin.foo:80", True),
    ("httpbin.foo.svc.cluster.local.", True), ("a.httpbin.example", True),
    ("httpbin.foo:8000", False),        # only the default port is stripped
    ("httpbin.example", False),         # "*.httpbin.example" needs the dot
    ("evil.foo", False), (None, False),
])
def test_hosts(host, allowed):
    assert decide("15-hosts.yaml", req(SLEEP, host=host))[0] is allowed


@pytest.mark.parametrize("port, method, allowed", [
    (9000, None, True), (9001, None, True),
    (9002, None, False),            # the rule with methods never allows TCP
    (9002, "GET", True),            # but it does allow HTTP GET on 9002
    (9003, None, False),
])
def test_tcp_ports(port, method, allowed):
    assert decide("16-tcp-ports.yaml", req(SLEEP, app="tcp-echo", port=port, method=method))[0] is allowed


@pytest.mark.parametrize("port, method, allowed", [
    (9000, None, False),            # method dropped on TCP: every connection to 9000
    (9000, "GET", False),
    (9000, "POST", True),
    (9001, None, True),
])
def test_tcp_deny_with_method(port, method, allowed):
    assert decide("17-tcp-deny-with-method.yaml",
                  req(SLEEP, app="tcp-echo", port=port, method=method))[0] is allowed


# --------------------------------------------------------------------------
# Fail closed: documents with features meshlet does not implement


@pytest.mark.parametrize("name, where, message", [
    ("custom-ext-authz.yaml", "12:11: spec.action", "action CUSTOM (external authorization) is not supported"),
    ("remote-ip-blocks.yaml", "16:9: spec.rules[0].from[0].source.remoteIpBlocks",
     "remoteIpBlocks (X-Forwarded-For) are not supported"),
    ("path-template.yaml", "15:17: spec.rules[0].to[0].operation.paths[0]",
     "path templates ('{*}', '{**}') are not supported"),
])
def test_unsupported_documents_fail_closed(name, where, message):
    path = UNSUPPORTED / name
    with pytest.raises(SourceError) as ei:
        load_policies(path)
    text = str(ei.value)
    assert f"{path}:{where}: " in text and message in text, text
    # one bad document in a set: nothing loads
    with pytest.raises(SourceError):
        load_policies([DOCS / "04-allow-by-principal.yaml", path])


def test_dry_run_annotation_fails_closed():
    with pytest.raises(SourceError, match="dry-run"):
        load_policies(UNSUPPORTED / "dry-run-annotation.yaml")
