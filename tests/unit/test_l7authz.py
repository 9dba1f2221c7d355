"""Per-request authorization (agent/proxy/l7authz.py): the fast path is taken
only when it cannot change a decision, and a reload applies to the next request."""

from __future__ import annotations

from agent.policy.load import parse_policies
from agent.policy.model import PolicySet
from agent.proxy.authz import authorize, empty_set
from agent.proxy.l7authz import Denial, RequestAuthorizer

CLIENT = "spiffe://cluster.local/ns/shop/sa/frontend"
OTHER = "spiffe://cluster.local/ns/other/sa/x"


def policies(body: str) -> PolicySet:
    return parse_policies(body, "t.yaml")


DENY_ADMIN = """
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"""

ALLOW_GET_API = """
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-api, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"], hosts: ["backend.shop"]}}]
"""

AUDIT_POSTS = """
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-posts, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: AUDIT
  rules: [{to: [{operation: {methods: [POST]}}]}]
"""

ALLOW_ALL_FRONTEND = """
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]}]
"""


class Current:
    """A swappable policy set, as the proxy's watcher offers it."""

    def __init__(self, ps: PolicySet) -> None:
        self.ps = ps

    def __call__(self) -> PolicySet:
        return self.ps


def authorizer(cur: Current, identity: str | None = CLIENT, port: int = 8080) -> RequestAuthorizer:
    tcp = authorize(cur(), src_identity=identity, src_ip="10.0.0.9", dst=_pod(), port=port)
    return RequestAuthorizer(cur, identity=identity, src_ip="10.0.0.9", namespace="shop",
                             labels={"app": "backend"}, port=port, tcp_allowed=tcp.allowed)


def _pod():
    class P:  # what authorize() reads of a pod
        namespace = "shop"
        key = "shop/backend-1"
        label_map = {"app": "backend"}
    return P()


def get(az: RequestAuthorizer, path: str, method: bytes = b"GET", host: bytes | None = b"backend.shop",
        headers: list[tuple[bytes, bytes]] | None = None):
    return az.decide(method, path, host, headers or [(b"Host", host or b"")])


def test_deny_rule_with_paths_denies_tcp_but_only_matching_requests():
    cur = Current(policies(DENY_ADMIN))
    az = authorizer(cur)
    assert az.tcp_allowed is False  # Istio drops a DENY rule's HTTP fields for TCP
    d = get(az, "/admin")
    assert not d.allowed and d.policy == "shop/deny-admin"
    assert get(az, "/admin/users").allowed is False
    assert get(az, "/api/items").allowed is True
    assert get(az, "/administrator").allowed is True  # exact + "/admin/*" only


def test_allowed_tcp_takes_the_fast_path_and_no_policy_means_no_evaluation():
    cur = Current(empty_set())
    az = authorizer(cur)
    assert az.tcp_allowed
    assert get(az, "/anything") is None  # allowed without evaluation
    cur.ps = policies(ALLOW_ALL_FRONTEND)
    assert get(az, "/anything") is None  # an L4-only ALLOW that matches: still nothing to evaluate


def test_a_reload_applies_to_the_next_request_on_the_same_connection():
    cur = Current(empty_set())
    az = authorizer(cur)
    assert get(az, "/admin") is None
    cur.ps = policies(DENY_ADMIN)
    d = get(az, "/admin")
    assert d is not None and not d.allowed
    cur.ps = empty_set()
    assert get(az, "/admin") is None


def test_allow_with_http_fields_matches_method_path_host_and_principal():
    cur = Current(policies(ALLOW_GET_API))
    az = authorizer(cur)
    assert not az.tcp_allowed  # ALLOW rules with HTTP fields never match TCP
    assert get(az, "/api/x").allowed
    assert not get(az, "/api/x", method=b"POST").allowed
    assert not get(az, "/api/x", method=b"get").allowed  # methods are case-sensitive
    assert not get(az, "/other").allowed
    assert get(az, "/api/x", host=b"BACKEND.shop:80").allowed  # host: case and default port
    assert not get(az, "/api/x", host=b"backend.shop:8080").allowed
    other = authorizer(cur, identity=OTHER)
    assert not get(other, "/api/x").allowed
    plaintext = authorizer(cur, identity=None)
    assert not get(plaintext, "/api/x").allowed


def test_audit_with_http_fields_is_evaluated_per_request_without_blocking():
    cur = Current(policies(AUDIT_POSTS))
    az = authorizer(cur)
    assert az.tcp_allowed
    d = get(az, "/x", method=b"POST")
    assert d is not None and d.allowed and [a.policy for a in d.audited] == ["shop/audit-posts"]
    d = get(az, "/x")
    assert d is not None and d.allowed and not d.audited


def test_headers_match_every_value_of_a_repeated_header():
    cur = Current(policies("""
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules: [{when: [{key: "request.headers[x-debug]", values: ["1"]}]}]
"""))
    az = authorizer(cur)
    hs = [(b"Host", b"backend.shop"), (b"X-Debug", b"0"), (b"x-debug", b"1")]
    assert not get(az, "/", headers=hs).allowed
    assert get(az, "/", headers=[(b"Host", b"backend.shop"), (b"X-Debug", b"0")]).allowed


def test_an_unusable_host_is_refused_not_evaluated():
    cur = Current(policies(DENY_ADMIN))
    az = authorizer(cur)
    d = get(az, "/api", host=b"bad host")
    assert isinstance(d, Denial) and d.status == 400


# ---- the per-connection memo of decisions (method, path, Host)

def test_a_repeated_request_reuses_its_decision_and_a_reload_still_applies_to_the_next():
    cur = Current(policies(ALLOW_GET_API))
    az = authorizer(cur)
    first = get(az, "/api/x")
    assert first.allowed and get(az, "/api/x") is first  # remembered
    assert not get(az, "/api/x", method=b"POST").allowed  # the key has the method...
    assert not get(az, "/api/x", host=b"backend.shop:8080").allowed  # ...and the Host as sent
    assert get(az, "/api/x", host=b"BACKEND.shop:80").allowed
    # a reload to a set with the same version string: a different set, decided anew
    cur.ps = PolicySet(policies=policies(DENY_ADMIN + "---" + ALLOW_GET_API.replace("GET", "POST")).policies,
                       version=cur.ps.version)
    d = get(az, "/api/x")
    assert d is not first and not d.allowed
    assert get(az, "/api/x", method=b"POST").allowed


def test_rules_that_read_headers_or_tokens_are_never_remembered():
    cur = Current(policies(ALLOW_GET_API + """---
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules: [{when: [{key: "request.headers[x-debug]", values: ["1"]}]}]
"""))
    az = authorizer(cur)
    host = (b"Host", b"backend.shop")
    assert get(az, "/api/x", headers=[host]).allowed
    assert not get(az, "/api/x", headers=[host, (b"X-Debug", b"1")]).allowed
    assert get(az, "/api/x", headers=[host]).allowed
    assert az._memo is None


def test_the_memo_is_bounded():
    from agent.proxy.l7authz import DECISION_MEMO_SIZE

    cur = Current(policies(ALLOW_GET_API))
    az = authorizer(cur)
    for i in range(DECISION_MEMO_SIZE + 10):
        assert get(az, f"/api/{i}").allowed
    assert az._memo is not None and len(az._memo) <= DECISION_MEMO_SIZE
