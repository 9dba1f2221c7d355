"""The end-user JWT corpus (agent/policy/jwtauth.py): keys made here (RSA,
EC P-256, Ed25519), real signatures by PyJWT, and the bad tokens an attacker
would try.  authenticate() is pure: headers, query, rules, now, keys."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from agent.policy.jwtauth import (
    MAX_TOKEN_BYTES,
    JwksError,
    KeySet,
    authenticate,
    parse_jwks,
)
from agent.policy.model import ClaimToHeader, HeaderLocation, JwtRule

NOW = 1_800_000_000.0
ISS = "https://issuer.example"


@pytest.fixture(scope="module")
def keys():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwks = []
    for kid, alg, k in (
        ("r1", RSAAlgorithm, rsa_key),
        ("e1", ECAlgorithm, ec_key),
        ("d1", OKPAlgorithm, ed_key),
    ):
        j = json.loads(alg.to_jwk(k.public_key()))
        j["kid"] = kid
        jwks.append(j)
    return {"rsa": rsa_key, "ec": ec_key, "ed": ed_key, "jwks": json.dumps({"keys": jwks})}


def _claims(**over):
    c = {"iss": ISS, "sub": "alice", "aud": "orders", "exp": NOW + 300, "iat": NOW - 10}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _sign(keys, claims=None, alg="RS256", kid="r1", key=None):
    k = key if key is not None else {"RS256": keys["rsa"], "ES256": keys["ec"], "EdDSA": keys["ed"]}[alg]
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims if claims is not None else _claims(), k, algorithm=alg, headers=headers)


def _rule(keys, **over) -> JwtRule:
    kw: dict = {"issuer": ISS, "audiences": ("orders",), "jwks": keys["jwks"]}
    kw.update(over)
    return JwtRule(**kw)


def _auth(keys, headers=(), query=None, rules=None, now=NOW):
    rules = rules if rules is not None else [_rule(keys)]

    def ks(rule: JwtRule) -> KeySet:
        return parse_jwks(rule.jwks)

    return authenticate(list(headers), query, rules, now, ks)


def _bearer(tok: str):
    return [(b"Authorization", b"Bearer " + tok.encode())]


def _b64(d) -> str:
    raw = d if isinstance(d, bytes) else json.dumps(d).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# --- valid tokens, each key type


@pytest.mark.parametrize(("alg", "kid"), [("RS256", "r1"), ("ES256", "e1"), ("EdDSA", "d1"), ("ES256", None)])
def test_valid_token_each_key_type(keys, alg, kid):
    r = _auth(keys, _bearer(_sign(keys, alg=alg, kid=kid)))
    assert r.ok and r.auth is not None
    assert r.auth.principal == f"{ISS}/alice"
    assert r.auth.audiences == ("orders",)
    # the token is not forwarded (forwardOriginalToken is false)
    assert r.forward_headers(_bearer("x") + [(b"Accept", b"*/*")]) == [(b"Accept", b"*/*")]


def test_no_token_passes_unauthenticated(keys):
    r = _auth(keys, [(b"Accept", b"*/*")])
    assert r.ok and r.auth is None
    # another scheme in Authorization is no token either
    r = _auth(keys, [(b"Authorization", b"Basic YWxpY2U6cHc=")])
    assert r.ok and r.auth is None


def test_no_rules_changes_nothing(keys):
    r = authenticate(_bearer("garbage"), None, [], NOW, lambda _r: None)
    assert r.ok and r.auth is None and not r.changes_request


# --- times


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (_claims(exp=NOW - 61), "Jwt is expired"),
        (_claims(nbf=NOW + 61), "Jwt not yet valid"),
        (_claims(iat=NOW + 61), "Jwt issued in the future"),
        (_claims(exp="tomorrow"), "Jwt claim exp is not a number"),
        (_claims(exp=True), "Jwt claim exp is not a number"),
    ],
)
def test_time_claims_refused(keys, claims, reason):
    r = _auth(keys, _bearer(_sign(keys, claims)))
    assert not r.ok and r.reason == reason


def test_clock_skew_tolerated(keys):
    assert _auth(keys, _bearer(_sign(keys, _claims(exp=NOW - 59)))).ok
    assert _auth(keys, _bearer(_sign(keys, _claims(nbf=NOW + 59)))).ok
    tok = _sign(keys, _claims(exp=NOW - 5))
    ks = parse_jwks(keys["jwks"])
    assert not authenticate(_bearer(tok), None, [_rule(keys)], NOW, lambda _r: ks, clock_skew=0).ok


# --- audience, issuer


def test_wrong_audience(keys):
    r = _auth(keys, _bearer(_sign(keys, _claims(aud=["payments", "shipping"]))))
    assert not r.ok and r.reason == "Audiences in Jwt are not allowed"
    assert _auth(keys, _bearer(_sign(keys, _claims(aud=["payments", "orders"])))).ok
    # no audience claim at all, with audiences required
    assert not _auth(keys, _bearer(_sign(keys, _claims(aud=None)))).ok
    # a rule without audiences does not check them
    assert _auth(keys, _bearer(_sign(keys, _claims(aud="x"))), rules=[_rule(keys, audiences=())]).ok


def test_wrong_issuer(keys):
    r = _auth(keys, _bearer(_sign(keys, _claims(iss="https://evil.example"))))
    assert not r.ok and r.reason == "Jwt issuer is not configured"
    r = _auth(keys, _bearer(_sign(keys, _claims(iss=None))))
    assert not r.ok


# --- algorithm attacks


def test_alg_none_refused(keys):
    tok = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims()) + "."
    r = _auth(keys, _bearer(tok))
    assert not r.ok
    tok = _b64({"alg": "none", "kid": "r1"}) + "." + _b64(_claims()) + "." + _b64(b"x")
    assert not _auth(keys, _bearer(tok)).ok


def test_hs256_with_rsa_public_key_as_secret_refused(keys):
    """Key confusion: the attacker signs HS256 with the public key PEM."""
    pem = (
        keys["rsa"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = _b64({"alg": "HS256", "kid": "r1", "typ": "JWT"})
    body = _b64(_claims())
    import hashlib
    import hmac

    sig = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    tok = f"{header}.{body}.{_b64(sig)}"
    r = _auth(keys, _bearer(tok))
    assert not r.ok and r.reason == "Jwks doesn't have key to match kid or alg from Jwt"
    # the same with the JWK's own n as secret, and without kid
    header2 = _b64({"alg": "HS256"})
    sig2 = hmac.new(pem, f"{header2}.{body}".encode(), hashlib.sha256).digest()
    assert not _auth(keys, _bearer(f"{header2}.{body}.{_b64(sig2)}")).ok


def test_alg_of_another_key_type_refused(keys):
    # an EC signature claiming the RSA key's kid
    tok = _sign(keys, alg="ES256", kid="r1")
    assert not _auth(keys, _bearer(tok)).ok


# --- tampering


def test_tampered_signature_and_payload(keys):
    tok = _sign(keys)
    h, p, s = tok.split(".")
    sig = bytearray(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    sig[10] ^= 0x01
    r = _auth(keys, _bearer(f"{h}.{p}.{_b64(bytes(sig))}"))
    assert not r.ok and r.reason == "Jwt verification fails"
    forged = _b64(_claims(sub="admin"))
    r = _auth(keys, _bearer(f"{h}.{forged}.{s}"))
    assert not r.ok and r.reason == "Jwt verification fails"
    # non-canonical base64url (padding) is refused before any crypto
    assert not _auth(keys, _bearer(f"{h}.{p}.{s}=")).ok


def test_unknown_kid(keys):
    r = _auth(keys, _bearer(_sign(keys, kid="nope")))
    assert not r.ok and r.reason == "Jwks doesn't have key to match kid or alg from Jwt"


def test_signed_by_another_key(keys):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    r = _auth(keys, _bearer(_sign(keys, key=other)))
    assert not r.ok and r.reason == "Jwt verification fails"


# --- size and JSON bounds


def test_oversized_token(keys):
    tok = _sign(keys, _claims(pad="x" * MAX_TOKEN_BYTES))
    r = _auth(keys, _bearer(tok))
    assert not r.ok and r.reason == "Jwt is too large"


@pytest.mark.parametrize("where", ["header", "payload"])
def test_nested_json_bomb(keys, where):
    bomb = '{"a":' * 40 + "1" + "}" * 40
    header = (
        '{"alg":"RS256","kid":"r1","x":' + bomb + "}" if where == "header" else '{"alg":"RS256","kid":"r1"}'
    )
    payload = (
        json.dumps(_claims())[:-1] + ',"x":' + bomb + "}" if where == "payload" else json.dumps(_claims())
    )
    tok = f"{_b64(header.encode())}.{_b64(payload.encode())}.{_b64(b'sig')}"
    r = _auth(keys, _bearer(tok))
    assert not r.ok and r.reason == f"Jwt {where} is an invalid JSON"
    # a bomb deep enough to hit json's recursion limit is refused the same way
    deep = "[" * 3000 + "]" * 3000
    tok = f"{_b64(b'{}')}.{_b64(deep.encode())}.{_b64(b's')}"
    assert not _auth(keys, _bearer(tok)).ok


def test_duplicate_claims_refused(keys):
    body = json.dumps(_claims())[:-1] + ', "sub": "admin"}'
    signing = _b64({"alg": "RS256", "kid": "r1"}) + "." + _b64(body.encode())
    sig = RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing.encode(), keys["rsa"])
    r = _auth(keys, _bearer(f"{signing}.{_b64(sig)}"))
    assert not r.ok and r.reason == "Jwt payload is an invalid JSON"
    # the same token without the duplicate is fine: the signature was not the problem
    body = json.dumps(_claims())
    signing = _b64({"alg": "RS256", "kid": "r1"}) + "." + _b64(body.encode())
    sig = RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing.encode(), keys["rsa"])
    assert _auth(keys, _bearer(f"{signing}.{_b64(sig)}")).ok


def test_crit_header_refused(keys):
    tok = jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "r1", "crit": ["exp"]})
    assert not _auth(keys, _bearer(tok)).ok


# --- where tokens are


def test_token_in_the_wrong_header_is_no_token(keys):
    rule = _rule(keys, from_headers=(HeaderLocation("x-jwt-assertion"),))
    tok = _sign(keys)
    r = _auth(keys, _bearer(tok), rules=[rule])
    assert r.ok and r.auth is None  # not where this rule looks: unauthenticated, judged by policy
    r = _auth(keys, [(b"X-JWT-Assertion", tok.encode())], rules=[rule])
    assert r.ok and r.auth is not None
    assert r.forward_headers([(b"X-JWT-Assertion", tok.encode())]) == []


def test_header_prefix(keys):
    rule = _rule(keys, from_headers=(HeaderLocation("x-token", "Token "),))
    tok = _sign(keys)
    assert _auth(keys, [(b"x-token", b"Token " + tok.encode())], rules=[rule]).auth is not None
    assert _auth(keys, [(b"x-token", tok.encode())], rules=[rule]).auth is None


def test_token_in_query(keys):
    tok = _sign(keys)
    r = _auth(keys, [], query=f"a=1&access_token={tok}&b=2")
    assert r.ok and r.auth is not None
    assert r.forward_query(f"a=1&access_token={tok}&b=2") == "a=1&b=2"
    rule = _rule(keys, from_params=("jwt",), forward_original_token=True)
    r = _auth(keys, [], query=f"jwt={tok}", rules=[rule])
    assert r.auth is not None and r.forward_query(f"jwt={tok}") == f"jwt={tok}"
    # a rule with only fromParams does not look in Authorization
    assert _auth(keys, _bearer(tok), rules=[rule]).auth is None


def test_several_tokens_refused(keys):
    a, b = _sign(keys), _sign(keys, _claims(sub="bob"))
    r = _auth(keys, _bearer(a) + _bearer(b))
    assert not r.ok and r.reason == "several Jwts in the request"
    r = _auth(keys, _bearer(a), query=f"access_token={b}")
    assert not r.ok
    # the same token twice is one token
    assert _auth(keys, _bearer(a) + _bearer(a)).ok


def test_empty_bearer_refused(keys):
    assert not _auth(keys, [(b"Authorization", b"Bearer ")]).ok


# --- output headers


def test_output_claims_and_no_injection(keys):
    rule = _rule(
        keys,
        output_claim_to_headers=(
            ClaimToHeader("x-user", "sub"),
            ClaimToHeader("x-tenant", "org.tenant"),
            ClaimToHeader("x-admin", "admin"),
            ClaimToHeader("x-groups", "groups"),
        ),
        output_payload_to_header="x-jwt-payload",
    )
    tok = _sign(keys, _claims(org={"tenant": "acme"}, admin=False, groups=["a"]))
    sent = _bearer(tok) + [(b"X-User", b"mallory"), (b"x-jwt-payload", b"forged"), (b"Accept", b"*/*")]
    r = _auth(keys, sent, rules=[rule])
    out = r.forward_headers(sent)
    assert (b"Accept", b"*/*") in out
    got = {k: v for k, v in out}
    assert got[b"x-user"] == b"alice" and got[b"x-tenant"] == b"acme" and got[b"x-admin"] == b"false"
    assert b"x-groups" not in got  # lists are not copied (Istio: string, integer, boolean)
    assert [v for k, v in out if k.lower() == b"x-user"] == [b"alice"]
    payload = got[b"x-jwt-payload"]
    assert json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))["sub"] == "alice"
    # without a token the client's copies are removed all the same
    r = _auth(keys, [(b"X-User", b"mallory")], rules=[rule])
    assert r.ok and r.forward_headers([(b"X-User", b"mallory")]) == []


def test_claim_with_control_characters_not_copied(keys):
    rule = _rule(keys, output_claim_to_headers=(ClaimToHeader("x-user", "sub"),))
    r = _auth(keys, _bearer(_sign(keys, _claims(sub="a\r\nx-admin: 1"))), rules=[rule])
    assert r.ok and r.add_headers == ()


def test_claims_for_policy(keys):
    tok = _sign(keys, _claims(azp="web", scope=["orders", "read"], org={"team": "t1"}))
    a = _auth(keys, _bearer(tok)).auth
    assert a is not None
    assert a.presenter == "web"
    assert a.claim(["scope"]) == ("orders", "read")
    assert a.claim(["org", "team"]) == ("t1",)
    assert a.claim(["org", "missing"]) == ()


def test_keys_unavailable_refuses(keys):
    r = authenticate(_bearer(_sign(keys)), None, [_rule(keys)], NOW, lambda _r: None)
    assert not r.ok and r.reason == "Jwks is not available"


# --- JWKS parsing


def test_jwks_refusals(keys):
    with pytest.raises(JwksError, match="symmetric"):
        parse_jwks(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    priv = json.loads(RSAAlgorithm.to_jwk(keys["rsa"]))
    with pytest.raises(JwksError, match="private"):
        parse_jwks(json.dumps({"keys": [priv]}))
    pub = json.loads(RSAAlgorithm.to_jwk(keys["rsa"].public_key()))
    with pytest.raises(JwksError, match="does not fit"):
        parse_jwks(json.dumps({"keys": [{**pub, "alg": "HS256"}]}))
    with pytest.raises(JwksError, match="use"):
        parse_jwks(json.dumps({"keys": [{**pub, "use": "enc"}]}))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(JwksError, match="2048"):
        parse_jwks(RSAAlgorithm.to_jwk(small.public_key()).join(['{"keys":[', "]}"]))
    with pytest.raises(JwksError, match="JSON"):
        parse_jwks('{"keys": [}')
    with pytest.raises(JwksError, match="non-empty"):
        parse_jwks('{"keys": []}')
    ks = parse_jwks(keys["jwks"])
    assert {k.kid: k.algorithms for k in ks.keys}["e1"] == frozenset({"ES256"})
    assert {k.kid: k.algorithms for k in ks.keys}["d1"] == frozenset({"EdDSA"})
    assert not any(a.startswith(("HS", "none")) for k in ks.keys for a in k.algorithms)
