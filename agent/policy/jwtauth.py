"""End-user JWT authentication (RequestAuthentication), as a pure function.

:func:`authenticate` takes what one HTTP request carries (its header lines
and its query), the JWT rules that apply to the destination workload, the
time and a way to get each rule's keys, and returns an
:class:`AuthnResult`: no token (the request goes on to policy with no
request principal: Istio's semantics), a valid token (the principal
``<iss>/<sub>``, audiences, presenter and claims, for ``request.auth.*``),
or a refusal (401).  It does no I/O, so the HTTP/1.1 session and an HTTP/2
stream call the same function; :meth:`AuthnResult.forward_headers` and
:meth:`AuthnResult.forward_query` give what is forwarded.

What is checked, in order (every failure is a 401 with a fixed reason; no
text from the token is echoed):

1. Extraction: each rule's ``fromHeaders`` (name + prefix) and
   ``fromParams``; without either, ``Authorization: Bearer`` and
   ``access_token``.  More than one distinct token in a request is refused
   (which one would the principal come from?).  A header without the
   prefix carries no token.
2. Shape: at most :data:`MAX_TOKEN_BYTES`; three base64url segments
   (canonical encoding, no padding); header and payload are JSON objects in
   UTF-8, at most :data:`MAX_JSON_DEPTH` levels deep, without duplicate
   member names (two ``sub`` claims would mean different things to
   different parsers), ``NaN`` or ``Infinity``.  ``crit`` and ``b64``
   (JWS extensions) are refused; ``jku``, ``x5u``, ``jwk``, ``x5c`` are
   never used to find keys.
3. Issuer: the token's ``iss`` selects the rules with that issuer among
   those whose locations carried it; none: refused.
4. Signature: the header's ``alg`` must be one the key allows by its type
   (:func:`parse_jwks`: RSA keys RS/PS 256-512, EC keys the ES algorithm of
   their curve, OKP keys EdDSA; a key's own ``alg`` narrows that).  ``none``
   and the HMAC algorithms are never allowed, so an HS256 token signed with
   an RSA public key as the secret finds no key (no key confusion).  A
   ``kid`` picks that key (unknown kid: refused); without one every key
   that allows the algorithm is tried.  The signature is checked by PyJWT's
   algorithm classes (``cryptography`` underneath).
5. Claims: ``exp``, ``nbf`` and ``iat`` (numbers when present) against
   ``now`` with ``clock_skew`` seconds of tolerance; ``aud`` must contain
   one of the rule's ``audiences`` when it lists any.

Forwarding: the token is removed from where it was found (header or query
parameter) unless the rule says ``forwardOriginalToken``; the headers of
``outputClaimToHeaders`` / ``outputPayloadToHeader`` of every rule that
applies are removed from the client's request first, whatever the token,
so a client can never send them itself; then the proxy sets them from the
validated token.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .model import AuthInfo, JwtRule

__all__ = [
    "MAX_TOKEN_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_JWKS_BYTES",
    "MAX_JWKS_KEYS",
    "DEFAULT_CLOCK_SKEW",
    "JwksError",
    "KeySet",
    "Key",
    "AuthInfo",
    "AuthnResult",
    "NO_TOKEN",
    "parse_jwks",
    "cached_jwks",
    "authenticate",
    "www_authenticate",
]

#: A token longer than this is refused before it is decoded.
MAX_TOKEN_BYTES = 8192
#: Nesting of JSON arrays/objects allowed in a token's header or payload.
MAX_JSON_DEPTH = 16
#: A JWKS (inline or file) larger than this, or with more keys, is refused.
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
#: Seconds of clock difference tolerated for exp / nbf / iat (proxy.jwtClockSkew).
DEFAULT_CLOCK_SKEW = 60.0

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_B64URL = re.compile(rb"[A-Za-z0-9_-]*")


@functools.cache
def _algorithms() -> dict[str, Any]:
    # PyJWT (and the cryptography primitives under it) only once a JWKS is
    # parsed: a proxy worker without JWT rules never imports it (footprint).
    from jwt.algorithms import get_default_algorithms

    return get_default_algorithms()


class JwksError(ValueError):
    """A JWKS that cannot be used; the message says why."""


@dataclass(frozen=True)
class Key:
    kid: str | None
    algorithms: frozenset[str]
    """What this key may verify (never ``none`` nor HS*)."""
    key: Any = field(compare=False, repr=False)
    """The ``cryptography`` public key object."""


@dataclass(frozen=True)
class KeySet:
    keys: tuple[Key, ...]


def _key_algorithms(jwk: Mapping[str, Any], i: int) -> frozenset[str]:
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise JwksError(f"keys[{i}].alg must be a string")
    if kty == "RSA":
        allowed = _RSA_ALGS
    elif kty == "EC":
        crv = jwk.get("crv")
        if crv not in _EC_ALGS:
            raise JwksError(f"keys[{i}]: EC curve {crv!r} is not supported (P-256, P-384, P-521)")
        allowed = frozenset({_EC_ALGS[crv]})
    elif kty == "OKP":
        if jwk.get("crv") not in _OKP_CURVES:
            raise JwksError(f"keys[{i}]: OKP curve {jwk.get('crv')!r} is not supported (Ed25519, Ed448)")
        allowed = frozenset({"EdDSA"})
    elif kty == "oct":
        raise JwksError(
            f"keys[{i}]: symmetric (oct) keys are not accepted: a shared secret in a policy "
            "would let every reader of the policy mint tokens; use RSA, EC or Ed25519 keys"
        )
    else:
        raise JwksError(f"keys[{i}].kty {kty!r} is not one of RSA, EC, OKP")
    if alg is not None:
        if alg not in allowed:
            raise JwksError(f"keys[{i}]: alg {alg!r} does not fit a {kty} key (allowed: {sorted(allowed)})")
        allowed = frozenset({alg})
    return allowed


def parse_jwks(text: str | bytes) -> KeySet:
    """A JWKS document (``{"keys": [...]}``) of public signing keys.
    Raises JwksError naming the key and what is wrong."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_JWKS_BYTES:
        raise JwksError(f"the JWKS has {len(raw)} bytes; at most {MAX_JWKS_BYTES}")
    try:
        doc = _strict_json(raw)
    except ValueError as e:
        raise JwksError(f"the JWKS is not valid JSON: {e}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        raise JwksError('a JWKS is an object with a non-empty "keys" list')
    if len(keys) > MAX_JWKS_KEYS:
        raise JwksError(f"the JWKS has {len(keys)} keys; at most {MAX_JWKS_KEYS}")
    out = []
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise JwksError(f"keys[{i}] is not an object")
        private = [m for m in _PRIVATE_MEMBERS if m in jwk]
        if private and jwk.get("kty") != "oct":
            raise JwksError(
                f"keys[{i}] has private key members ({', '.join(private)}): publish only the public key"
            )
        algs = _key_algorithms(jwk, i)
        use = jwk.get("use")
        if use is not None and use != "sig":
            raise JwksError(f"keys[{i}].use is {use!r}; only signing keys ('sig') verify tokens")
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            raise JwksError(f"keys[{i}].key_ops does not include 'verify'")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwksError(f"keys[{i}].kid must be a string")
        from jwt import PyJWK
        from jwt.exceptions import PyJWKError

        try:
            key = PyJWK(jwk, algorithm=min(algs)).key
        except (PyJWKError, ValueError, TypeError, KeyError) as e:
            raise JwksError(f"keys[{i}] is not a usable {jwk.get('kty')} public key: {e}") from None
        if jwk.get("kty") == "RSA" and key.key_size < _MIN_RSA_BITS:
            raise JwksError(
                f"keys[{i}]: RSA keys need at least {_MIN_RSA_BITS} bits, this one has {key.key_size}"
            )
        out.append(Key(kid, algs, key))
    return KeySet(tuple(out))


@functools.lru_cache(maxsize=256)
def cached_jwks(text: str) -> KeySet:
    """:func:`parse_jwks`, remembered by text (a set's rules share their parsed keys)."""
    return parse_jwks(text)


# --------------------------------------------------------------------------
# JSON and base64url, strictly


def _depth_ok(raw: bytes) -> bool:
    """Nesting of ``[``/``{`` outside strings stays within MAX_JSON_DEPTH
    (checked before json.loads, which recurses)."""
    depth = 0
    in_str = esc = False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json(raw: bytes) -> Any:
    if not _depth_ok(raw):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _b64url(seg: bytes) -> bytes:
    if not _B64URL.fullmatch(seg) or len(seg) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(seg + b"=" * (-len(seg) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != seg:
        raise ValueError("not canonical base64url")
    return data


# --------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class AuthnResult:
    """What :func:`authenticate` decided.  ``ok`` False: refuse with 401
    (``reason``, :func:`www_authenticate`); ``auth`` None with ``ok``: no
    token, the request goes on to policy unauthenticated."""

    ok: bool
    auth: AuthInfo | None = None
    reason: str = ""
    remove_headers: frozenset[str] = frozenset()
    """Lower-case names removed from the forwarded request (client copies of
    output headers; the token's header unless forwarded)."""
    add_headers: tuple[tuple[bytes, bytes], ...] = ()
    remove_params: frozenset[str] = frozenset()
    """Query parameters (decoded names) removed from the forwarded target."""

    @property
    def changes_request(self) -> bool:
        return bool(self.remove_headers or self.add_headers or self.remove_params)

    def forward_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``headers`` as forwarded: removed ones dropped, the proxy's added."""
        rm = self.remove_headers
        out = [(k, v) for k, v in headers if k.decode("latin-1").lower() not in rm] if rm else list(headers)
        return out + list(self.add_headers)

    def forward_query(self, query: str | None) -> str | None:
        """The query as forwarded (None: no '?'); the token parameter removed."""
        if query is None or not self.remove_params:
            return query
        kept = [p for p in query.split("&") if _param_name(p) not in self.remove_params]
        return "&".join(kept) if kept else None


#: No rule applies: nothing to check, nothing to change.
NO_TOKEN = AuthnResult(True)


def www_authenticate(reason: str) -> bytes:
    """The ``WWW-Authenticate`` value of a 401 (RFC 6750; fixed text only)."""
    del reason  # the body says why; the header stays a constant
    return b'Bearer realm="meshlet", error="invalid_token"'


def _param_name(p: str) -> str:
    return unquote(p.split("=", 1)[0].replace("+", " "))


# --------------------------------------------------------------------------
# authenticate


@dataclass
class _Found:
    token: str
    rules: list[JwtRule]
    headers: set[str]
    params: set[str]


def _extract(
    headers: Sequence[tuple[bytes, bytes]], query: str | None, rules: Sequence[JwtRule]
) -> list[_Found] | str:
    """The distinct tokens of the request with the rules whose locations had
    them; a refusal reason when the request is malformed for JWT purposes."""
    by_token: dict[str, _Found] = {}
    wanted: dict[str, list[tuple[str, JwtRule]]] = {}
    for r in rules:
        for loc in r.header_locations:
            wanted.setdefault(loc.name, []).append((loc.prefix, r))
    if wanted:
        for k, v in headers:
            name = k.decode("latin-1").lower()
            locs = wanted.get(name)
            if not locs:
                continue
            value = v.decode("latin-1").strip()
            for prefix, r in locs:
                bare = prefix.strip()
                if prefix == "Bearer ":  # RFC 6750: the scheme is case-insensitive
                    if value.lower() == "bearer":
                        return "Jwt is empty"
                    if value[:7].lower() != "bearer ":
                        continue
                elif bare and value == bare:
                    return "Jwt is empty"
                elif not value.startswith(prefix):
                    continue
                token = value[len(prefix) :].strip()
                if not token:
                    return "Jwt is empty"
                f = by_token.setdefault(token, _Found(token, [], set(), set()))
                if r not in f.rules:
                    f.rules.append(r)
                f.headers.add(name)
    params: dict[str, list[JwtRule]] = {}
    for r in rules:
        for p in r.param_locations:
            params.setdefault(p, []).append(r)
    if params and query:
        for part in query.split("&"):
            name = _param_name(part)
            prs = params.get(name)
            if not prs:
                continue
            token = unquote(part.split("=", 1)[1].replace("+", " ")) if "=" in part else ""
            if not token:
                return "Jwt is empty"
            f = by_token.setdefault(token, _Found(token, [], set(), set()))
            for r in prs:
                if r not in f.rules:
                    f.rules.append(r)
            f.params.add(name)
    return list(by_token.values())


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(name)
    return float(v)


def _decode(token: str) -> tuple[dict, dict, bytes, bytes] | str:
    """(header, payload, signing input, signature) or why not."""
    if len(token) > MAX_TOKEN_BYTES:
        return "Jwt is too large"
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        return "Jwt is not in the form of Header.Payload.Signature"
    parts = raw.split(b".")
    if len(parts) != 3:
        return "Jwt is not in the form of Header.Payload.Signature"
    try:
        header_b, payload_b, sig = (_b64url(p) for p in parts)
    except (ValueError, binascii.Error):
        return "Jwt is not in the form of Header.Payload.Signature"
    try:
        header = _strict_json(header_b)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "Jwt header is an invalid JSON"
    try:
        payload = _strict_json(payload_b)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "Jwt payload is an invalid JSON"
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        return "Jwt header is an invalid JSON"
    if "crit" in header or "b64" in header:
        return "Jwt header uses an extension (crit, b64) that is not supported"
    if "kid" in header and not isinstance(header["kid"], str):
        return "Jwt header is an invalid JSON"
    if not isinstance(payload, dict):
        return "Jwt payload is an invalid JSON"
    return header, payload, parts[0] + b"." + parts[1], sig


def _verify(header: dict, signing_input: bytes, sig: bytes, keys: KeySet) -> str | None:
    """None if some key of ``keys`` verifies the signature, else why not."""
    alg = header["alg"]
    kid = header.get("kid")
    cands = [k for k in keys.keys if kid is None or k.kid == kid]
    if not cands:
        return "Jwks doesn't have key to match kid or alg from Jwt"
    cands = [k for k in cands if alg in k.algorithms]
    if not cands:
        return "Jwks doesn't have key to match kid or alg from Jwt"
    impl = _algorithms()[alg]  # every alg a key allows is one PyJWT has
    for k in cands:
        try:
            if impl.verify(signing_input, k.key, sig):
                return None
        except (ValueError, TypeError):
            continue
    return "Jwt verification fails"


def _claims_problem(payload: dict, rule: JwtRule, now: float, skew: float) -> str | None:
    try:
        exp, nbf, iat = _number(payload, "exp"), _number(payload, "nbf"), _number(payload, "iat")
    except ValueError as e:
        return f"Jwt claim {e} is not a number"
    if exp is not None and now > exp + skew:
        return "Jwt is expired"
    if nbf is not None and now + skew < nbf:
        return "Jwt not yet valid"
    if iat is not None and now + skew < iat:
        return "Jwt issued in the future"
    aud = payload.get("aud")
    if aud is not None and not isinstance(aud, str):
        if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
            return "Jwt audiences are invalid"
    if "sub" in payload and not isinstance(payload["sub"], str):
        return "Jwt sub is not a string"
    if "azp" in payload and not isinstance(payload["azp"], str):
        return "Jwt azp is not a string"
    if rule.audiences:
        auds = [aud] if isinstance(aud, str) else (aud or [])
        if not any(a in rule.audiences for a in auds):
            return "Audiences in Jwt are not allowed"
    return None


def _claim_header_value(payload: Mapping[str, Any], claim: str) -> bytes | None:
    v: Any = payload
    for name in claim.split("."):
        if not isinstance(v, dict) or name not in v:
            return None
        v = v[name]
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, int):
        s = str(v)
    elif isinstance(v, str):
        s = v
    else:
        return None  # Istio/Envoy copy string, integer and boolean claims only
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        return None  # never a header value a client could not send itself
    return s.encode("utf-8")


def authenticate(
    headers: Sequence[tuple[bytes, bytes]],
    query: str | None,
    rules: Sequence[JwtRule],
    now: float,
    keys: Callable[[JwtRule], KeySet | None],
    *,
    clock_skew: float = DEFAULT_CLOCK_SKEW,
) -> AuthnResult:
    """Authenticate one request (see the module docstring).

    ``headers``: the request's header lines, raw; ``query``: the query
    without '?' (None: none); ``rules``: the JWT rules applying to the
    destination (``PolicySet.jwt_rules``); ``now``: seconds since the
    epoch; ``keys(rule)``: the rule's keys, None when they are not
    available (then its tokens are refused)."""
    if not rules:
        return NO_TOKEN
    outputs = frozenset(h for r in rules for h in r.output_headers)
    found = _extract(headers, query, rules)
    if isinstance(found, str):
        return AuthnResult(False, reason=found)
    if not found:
        return AuthnResult(True, remove_headers=outputs)
    if len(found) > 1:
        return AuthnResult(False, reason="several Jwts in the request")
    f = found[0]
    decoded = _decode(f.token)
    if isinstance(decoded, str):
        return AuthnResult(False, reason=decoded)
    header, payload, signing_input, sig = decoded
    iss = payload.get("iss")
    cands = [r for r in f.rules if r.issuer == iss] if isinstance(iss, str) else []
    if not cands:
        return AuthnResult(False, reason="Jwt issuer is not configured")
    why = "Jwks is not available"
    rule = None
    for r in cands:
        ks = keys(r)
        if ks is None:
            continue
        why_r = _verify(header, signing_input, sig, ks)
        if why_r is None:
            why_r = _claims_problem(payload, r, now, clock_skew if r.clock_skew is None else r.clock_skew)
            if why_r is None:
                rule = r
                break
        why = why_r
    if rule is None:
        return AuthnResult(False, reason=why)
    aud = payload.get("aud")
    auth = AuthInfo(
        issuer=iss,  # type: ignore[arg-type]  # a str: cands is empty otherwise
        subject=payload.get("sub"),
        audiences=(aud,) if isinstance(aud, str) else tuple(aud or ()),
        presenter=payload.get("azp"),
        claims=payload,
    )
    remove = set(outputs)
    params: frozenset[str] = frozenset()
    if not rule.forward_original_token:
        remove |= f.headers
        params = frozenset(f.params)
    add: list[tuple[bytes, bytes]] = []
    for c in rule.output_claim_to_headers:
        value = _claim_header_value(payload, c.claim)
        if value is not None:
            add.append((c.header.encode("ascii"), value))
    if rule.output_payload_to_header:
        add.append((rule.output_payload_to_header.encode("ascii"), signing_input.split(b".")[1]))
    return AuthnResult(True, auth, "", frozenset(remove), tuple(add), params)
