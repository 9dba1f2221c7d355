"""RequestAuthentication documents, requestPrincipals / request.auth.* in
AuthorizationPolicy (Istio's semantics), the compiled form, the store, and
the per-request JWT step of the destination proxy (l7authz)."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from agent.policy.compiled import from_data
from agent.policy.evaluate import Request, evaluate, explain, workload_index
from agent.policy.load import parse_policies
from agent.policy.model import AuthInfo
from agent.policy.store import PolicyStore
from agent.proxy.l7authz import Denial, RequestAuthorizer
from agent.yamlsrc import SourceError

ISS = "https://issuer.example"


@pytest.fixture(scope="module")
def key():
    k = ec.generate_private_key(ec.SECP256R1())
    pub = json.loads(ECAlgorithm.to_jwk(k.public_key()))
    pub["kid"] = "k1"
    return k, json.dumps({"keys": [pub]})


def authn_doc(jwks: str, api: str = "security.istio.io/v1", extra: str = "") -> str:
    return f"""\
apiVersion: {api}
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  jwtRules:
  - issuer: {ISS}
    audiences: [orders]
    jwks: '{jwks}'
    outputClaimToHeaders:
    - {{header: x-user, claim: sub}}
{extra}"""


ALLOW_SCOPE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from: [{source: {requestPrincipals: ["https://issuer.example/*"]}}]
    when:
    - {key: "request.auth.claims[scope]", values: [orders]}
  - to: [{operation: {paths: [/public/*]}}]
"""


def errors(text: str) -> list[str]:
    with pytest.raises(SourceError) as ei:
        parse_policies(text, "a.yaml")
    return [str(p) for p in ei.value.errors]


def http(auth: AuthInfo | None = None, path: str = "/x", port: int = 8080) -> Request:
    return Request("shop", {"app": "orders"}, port, is_http=True, method="GET", path=path, auth=auth)


def tcp(port: int = 8080) -> Request:
    return Request("shop", {"app": "orders"}, port)


def user(sub="alice", iss=ISS, **claims) -> AuthInfo:
    aud = claims.pop("aud", ("orders",))
    return AuthInfo(iss, sub, tuple(aud), claims.get("azp"), {"iss": iss, "sub": sub, **claims})


# --- loading


def test_both_apis_load_and_select(key):
    _, jwks = key
    for api in ("security.istio.io/v1", "security.istio.io/v1beta1", "meshlet.io/v1alpha1"):
        ps = parse_policies(authn_doc(jwks, api) + "---\n" + ALLOW_SCOPE, "a.yaml")
        (a,) = ps.authentications
        assert a.key == "shop/jwt" and a.jwt_rules[0].issuer == ISS
        assert ps.jwt_rules("shop", {"app": "orders"}) == a.jwt_rules
        assert ps.jwt_rules("shop", {"app": "web"}) == ()
        assert workload_index(ps, "shop", {"app": "orders"}).has_l7
    # formatting does not change the version; the keys do
    ps1 = parse_policies(authn_doc(jwks), "a.yaml")
    ps2 = parse_policies(authn_doc(jwks) + "# comment\n", "b.yaml")
    assert ps1.version == ps2.version
    other = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    assert parse_policies(authn_doc(json.dumps({"keys": [other]})), "a.yaml").version != ps1.version


def test_jwt_rule_fields(key):
    _, jwks = key
    extra = """\
    fromHeaders: [{name: X-Jwt, prefix: "Token "}]
    fromParams: [jwt]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
"""
    (r,) = parse_policies(authn_doc(jwks, extra=extra), "a.yaml").authentications[0].jwt_rules
    assert r.from_headers[0].name == "x-jwt" and r.from_headers[0].prefix == "Token "
    assert r.from_params == ("jwt",) and r.forward_original_token
    assert r.output_payload_to_header == "x-jwt-payload"
    assert r.origin == "a.yaml:7:5"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "    jwksUri: https://issuer.example/jwks\n",
            "a.yaml:12:14: spec.jwtRules[0].jwksUri: meshlet does not fetch keys",
        ),
        (
            "    jwksFile: /etc/jwks.json\n",
            "a.yaml:12:15: spec.jwtRules[0].jwksFile: jwksFile is a meshlet.io/v1alpha1 field",
        ),
        (
            "    fromCookies: [session]\n",
            "a.yaml:12:5: spec.jwtRules[0].fromCookies: fromCookies is not supported",
        ),
        ("    issuers: [x]\n", "a.yaml:12:5: spec.jwtRules[0].issuers: unknown field 'issuers'"),
        (
            "    outputPayloadToHeader: Host\n",
            "a.yaml:12:28: spec.jwtRules[0].outputPayloadToHeader: 'host' cannot be set",
        ),
        (
            "    fromHeaders: [{name: x-user}]\n",
            "a.yaml:7:5: spec.jwtRules[0]: header 'x-user' is both a token location",
        ),
    ],
)
def test_jwt_rule_errors(key, extra, expected):
    _, jwks = key
    got = errors(authn_doc(jwks, extra=extra))
    assert len(got) == 1 and got[0].startswith(expected), got


def test_jwks_errors_name_the_field():
    got = errors(authn_doc('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'))
    assert got[0].startswith("a.yaml:9:11: spec.jwtRules[0].jwks: jwks: keys[0]: symmetric (oct) keys")
    text = authn_doc("x").replace("    jwks: 'x'\n", "")
    assert errors(text)[0].startswith("a.yaml:7:5: spec.jwtRules[0]: no keys")


def test_meshlet_jwks_file_and_istio_file_uri(key):
    _, jwks = key
    text = authn_doc(jwks, api="meshlet.io/v1alpha1").replace(
        f"    jwks: '{jwks}'\n", "    jwksFile: /etc/k.json\n"
    )
    (r,) = parse_policies(text, "a.yaml").authentications[0].jwt_rules
    assert r.jwks_file == "/etc/k.json" and r.jwks == ""
    text = authn_doc(jwks).replace(f"    jwks: '{jwks}'\n", "    jwksUri: file:///etc/k.json\n")
    assert parse_policies(text, "a.yaml").authentications[0].jwt_rules[0].jwks_file == "/etc/k.json"
    rel = authn_doc(jwks, api="meshlet.io/v1alpha1").replace(
        f"    jwks: '{jwks}'\n", "    jwksFile: k.json\n"
    )
    assert errors(rel)[0].startswith(
        "a.yaml:9:15: spec.jwtRules[0].jwksFile: 'k.json' must be an absolute path"
    )


def test_target_refs_refused(key):
    _, jwks = key
    text = authn_doc(jwks).replace("spec:\n", "spec:\n  targetRefs: [{kind: Gateway, name: gw}]\n")
    assert errors(text)[0].startswith("a.yaml:5:3: spec.targetRefs: targetRefs (gateway/waypoint attachment)")


# --- requestPrincipals and request.auth.* (Istio semantics)


def test_request_principals_and_claims():
    ps = parse_policies(ALLOW_SCOPE, "a.yaml")
    assert evaluate(ps, http(user(scope=["read", "orders"]))).allowed
    assert evaluate(ps, http(user(scope="orders"))).allowed
    assert not evaluate(ps, http(user(scope=["read"]))).allowed  # claim mismatch
    assert not evaluate(ps, http(user(iss="https://other", scope="orders"))).allowed
    assert not evaluate(ps, http(None)).allowed  # no token: no principal
    assert evaluate(ps, http(None, path="/public/a")).allowed
    d, traces = explain(ps, http(None))
    assert not d.allowed and "no request principal" in traces[0].detail


def test_not_request_principals_and_presence():
    deny_anonymous = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: need-jwt, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
"""
    ps = parse_policies(deny_anonymous, "a.yaml")
    assert not evaluate(ps, http(None)).allowed
    assert evaluate(ps, http(user())).allowed
    assert not evaluate(ps, http(user(sub=None))).allowed  # no sub: no principal
    # TCP: the DENY rule's HTTP-only field is dropped, so it denies every connection (Istio)
    assert not evaluate(ps, tcp()).allowed


def test_allow_with_request_principal_never_matches_tcp():
    ps = parse_policies(ALLOW_SCOPE, "a.yaml")
    assert not evaluate(ps, tcp()).allowed
    assert workload_index(ps, "shop", {"app": "orders"}).ignored_on_tcp == 2


@pytest.mark.parametrize(
    ("key", "values", "auth", "allowed"),
    [
        ("request.auth.principal", ["https://issuer.example/alice"], user(), True),
        ("request.auth.principal", ["*/bob"], user(), False),
        ("request.auth.audiences", ["orders"], user(aud=["x", "orders"]), True),
        ("request.auth.audiences", ["pay*"], user(), False),
        ("request.auth.presenter", ["web"], user(azp="web"), True),
        ("request.auth.presenter", ["web"], user(), False),
        ("request.auth.claims[org][team]", ["t1"], user(org={"team": "t1"}), True),
        ("request.auth.claims[org][team]", ["t1"], user(org={"team": ["t2", "t1"]}), True),
        ("request.auth.claims[org][team]", ["t1"], user(org="t1"), False),
        ("request.auth.claims[groups]", ["admin*"], user(groups=["dev", "admins"]), True),
        ("request.auth.claims[iss]", ["*"], None, False),
    ],
)
def test_auth_conditions(key, values, auth, allowed):
    text = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec:
  rules:
  - when: [{{key: "{key}", values: {json.dumps(values)}}}]
"""
    ps = parse_policies(text, "a.yaml")
    assert evaluate(ps, http(auth)).allowed is allowed
    assert explain(ps, http(auth))[0].allowed is allowed


def test_not_values_on_claims():
    text = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  action: DENY
  rules:
  - when: [{key: "request.auth.claims[groups]", notValues: [admins]}]
"""
    ps = parse_policies(text, "a.yaml")
    assert evaluate(ps, http(user(groups=["admins"]))).allowed
    assert not evaluate(ps, http(user(groups=["dev"]))).allowed
    assert not evaluate(ps, http(None)).allowed


# --- the compiled form and the store


def test_compiled_round_trip(key):
    _, jwks = key
    ps = parse_policies(authn_doc(jwks) + "---\n" + ALLOW_SCOPE, "a.yaml")
    store = PolicyStore(None)
    store.apply([("a.yaml", authn_doc(jwks) + "---\n" + ALLOW_SCOPE)])
    doc = store.compiled()
    assert doc["version"] == ps.version == store.version
    back = from_data(
        doc["policies"], trust_domain="cluster.local", root_namespace="istio-system", version=ps.version
    )
    assert back.authentications == ps.authentications and back.policies == ps.policies
    assert parse_policies(doc["yaml"], "policies.yaml").version == ps.version
    assert store.summary()["byKind"] == {"AuthorizationPolicy": 1, "RequestAuthentication": 1}
    assert {r["kind"] for r in store.list()} == {"AuthorizationPolicy", "RequestAuthentication"}


def test_store_apply_delete_and_errors(tmp_path, key):
    _, jwks = key
    store = PolicyStore(str(tmp_path))
    changes = store.apply([("a.yaml", authn_doc(jwks))])
    assert [(c.kind, c.result) for c in changes] == [("RequestAuthentication", "created")]
    assert store.apply([("a.yaml", authn_doc(jwks))])[0].result == "unchanged"
    reloaded = PolicyStore(str(tmp_path)).load()
    assert reloaded.version == store.version and reloaded.policyset.authentications
    with pytest.raises(SourceError) as ei:
        store.apply([("b.yaml", authn_doc(jwks).replace("audiences: [orders]", "audiences: []"))])
    assert str(ei.value.errors[0]).startswith("b.yaml:8:16: spec.jwtRules[0].audiences: an empty list")
    assert store.delete("shop", "jwt", "RequestAuthentication")
    assert not store.policyset.authentications


# --- the destination proxy's per-request step


def _authorizer(ps, tcp_allowed=False):
    return RequestAuthorizer(
        lambda: ps,
        identity="spiffe://cluster.local/ns/shop/sa/web",
        src_ip="10.0.0.1",
        namespace="shop",
        labels={"app": "orders"},
        port=8080,
        tcp_allowed=tcp_allowed,
    )


def test_l7authz_401_403_200(key):
    k, jwks = key
    ps = parse_policies(authn_doc(jwks) + "---\n" + ALLOW_SCOPE, "a.yaml")
    az = _authorizer(ps)
    now = time.time()
    good = jwt.encode(
        {"iss": ISS, "sub": "alice", "aud": "orders", "exp": now + 60, "scope": "orders"},
        k,
        algorithm="ES256",
        headers={"kid": "k1"},
    )
    hdrs = [(b"Authorization", b"Bearer " + good.encode()), (b"X-User", b"mallory")]
    d = az.decide(b"GET", "/x", b"orders", hdrs)
    assert d is not None and not isinstance(d, Denial) and d.allowed
    assert az.authn.forward_headers(hdrs) == [(b"x-user", b"alice")]
    d = az.decide(b"GET", "/x", b"orders", [])
    assert d is not None and not isinstance(d, Denial) and not d.allowed  # 403 by policy
    d = az.decide(b"GET", "/x", b"orders", [(b"Authorization", b"Bearer " + good.encode() + b"x")])
    assert isinstance(d, Denial) and d.status == 401
    assert d.headers == ((b"WWW-Authenticate", b'Bearer realm="meshlet", error="invalid_token"'),)
    # a bad token is refused even where policy alone would let the connection through (fast path)
    az2 = _authorizer(parse_policies(authn_doc(jwks), "a.yaml"), tcp_allowed=True)
    assert az2.decide(b"GET", "/", b"o", [(b"X-User", b"m")]) is None
    assert az2.authn.forward_headers([(b"X-User", b"m")]) == []
    d = az2.decide(b"GET", "/", b"o", [(b"Authorization", b"Bearer a.b.c")])
    assert isinstance(d, Denial) and d.status == 401
    # expired at the time given
    d = az.decide(b"GET", "/x", b"o", hdrs, now=now + 3600)
    assert isinstance(d, Denial) and d.reason == "Jwt is expired"


def test_the_orders_example():
    import pathlib

    from agent.identity.spiffe import parse_spiffe_id
    from agent.policy.load import load_policies

    ps = load_policies(pathlib.Path(__file__).resolve().parents[2] / "policies")
    assert [a.key for a in ps.authentications] == ["shop/orders-login", "shop/storefront-login"]
    gw = parse_spiffe_id("spiffe://cluster.local/ns/ingress/sa/gateway")
    web = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/storefront")
    who = AuthInfo("https://login.example", "u1", ("orders",), None, {"scope": "orders"})

    def req(src, auth):
        return Request("shop", {"app": "orders"}, 8080, src, is_http=True, method="GET", path="/o", auth=auth)

    assert evaluate(ps, req(gw, who)).allowed
    assert not evaluate(ps, req(web, who)).allowed  # not through the gateway
    assert not evaluate(ps, req(gw, None)).allowed  # no end user
    assert not evaluate(ps, Request("shop", {"app": "orders"}, 8080, gw)).allowed  # TCP


def test_clock_skew_per_rule(key):
    k, jwks = key
    text = authn_doc(jwks, api="meshlet.io/v1alpha1", extra="    clockSkewSeconds: 0\n")
    ps = parse_policies(text, "a.yaml")
    assert ps.authentications[0].jwt_rules[0].clock_skew == 0.0
    az = _authorizer(ps)
    now = time.time()
    tok = jwt.encode(
        {"iss": ISS, "aud": "orders", "exp": now - 5}, k, algorithm="ES256", headers={"kid": "k1"}
    )
    d = az.decide(b"GET", "/", b"o", [(b"Authorization", b"Bearer " + tok.encode())], now=now)
    assert isinstance(d, Denial) and d.reason == "Jwt is expired"
    # the default (60 s) accepts the same token
    d = _authorizer(parse_policies(authn_doc(jwks), "a.yaml")).decide(
        b"GET", "/", b"o", [(b"Authorization", b"Bearer " + tok.encode())], now=now
    )
    assert not isinstance(d, Denial)
    assert errors(authn_doc(jwks, extra="    clockSkewSeconds: 5\n"))[0].startswith(
        "a.yaml:12:23: spec.jwtRules[0].clockSkewSeconds: clockSkewSeconds is a meshlet.io/v1alpha1 field"
    )


# --- evaluate() and explain() agree on request.auth (Hypothesis)


_VALS = st.sampled_from(["a", "b", "orders", "*", "or*", "*rs", "x/y"])
_KEYS = st.sampled_from(
    [
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[scope]",
        "request.auth.claims[org][team]",
    ]
)


@st.composite
def _policy_and_auth(draw):
    action = draw(st.sampled_from(["ALLOW", "DENY"]))
    src = ""
    if draw(st.booleans()):
        field = draw(st.sampled_from(["requestPrincipals", "notRequestPrincipals"]))
        pats = draw(
            st.lists(st.sampled_from(["*", "iss/a", "iss/*", "*/b", "other/a"]), min_size=1, max_size=2)
        )
        src = f"  - from: [{{source: {{{field}: {json.dumps(pats)}}}}}]\n"
    conds = draw(
        st.lists(st.tuples(_KEYS, st.booleans(), st.lists(_VALS, min_size=1, max_size=2)), max_size=2)
    )
    when = ""
    if conds:
        items = [
            f'{{key: "{k}", {"notValues" if neg else "values"}: {json.dumps(v)}}}' for k, neg, v in conds
        ]
        when = ("    when: [" if src else "  - when: [") + ", ".join(items) + "]\n"
    body = src + when or "  - {}\n"
    text = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n"
        f"spec:\n  action: {action}\n  rules:\n{body}"
    )
    auth = None
    if draw(st.booleans()):
        sub = draw(st.sampled_from(["a", "b", None]))
        claims = {
            "scope": draw(st.sampled_from(["orders", ["a", "orders"], 3, None])),
            "org": draw(st.sampled_from([{"team": "b"}, {"team": ["x", "a"]}, "a", None])),
        }
        auth = AuthInfo(
            draw(st.sampled_from(["iss", "other"])),
            sub,
            tuple(draw(st.lists(_VALS.filter(lambda v: "*" not in v), max_size=2))),
            draw(st.sampled_from(["a", None])),
            {k: v for k, v in claims.items() if v is not None},
        )
    return text, auth


@settings(max_examples=300, deadline=None)
@given(_policy_and_auth(), st.booleans())
def test_evaluate_equals_explain_with_auth(case, is_http):
    text, auth = case
    ps = parse_policies(text, "h.yaml")
    req = http(auth) if is_http else tcp()
    assert evaluate(ps, req).allowed == explain(ps, req)[0].allowed
    if not is_http:
        # TCP never sees end-user attributes: an ALLOW needing them never allows
        rule = ps.policies[0].rules[0]
        if ps.policies[0].action.value == "ALLOW" and rule.is_l7:
            assert not evaluate(ps, req).allowed
