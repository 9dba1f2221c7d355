"""A policy set as plain JSON data that rebuilds it without parsing YAML again.

The agent validates policies once, when they are applied (YAML with
positions, every check of :mod:`agent.policy.load`).  The proxy workers used
to read them back from the YAML text embedded in ``policies.json`` and
validate everything a second time, inside their event loop: 10,000 rules
took seconds of a worker's only thread.  This module writes what was
already validated as data (:func:`to_data`) and builds the same
:class:`~agent.policy.model.PolicySet` from it (:func:`from_data`): JSON
decoding is C, and rebuilding the frozen values is a fraction of parsing.

The rebuilt set is checked, not trusted: :func:`from_data` recomputes the
set's fingerprint (:func:`agent.policy.load.fingerprint`, a hash of the
meaning) and refuses a result whose version differs from the one the agent
wrote.  Origins (``file:line:column``) and the principals as written are
kept, so messages read as they do in the agent.

Shape of one policy (lists and fields that are empty are left out)::

    {"namespace": "shop", "name": "p", "action": "ALLOW", "selector": {"app": "web"},
     "apiVersion": "meshlet.io/v1alpha1", "origin": "f.yaml:1:1",
     "rules": [{"origin": "f.yaml:7:5",
                "sources": [{"principals": [["p", "ns/shop/sa/web", "exact", "cluster.local/ns/shop/sa/web"]],
                             "ipBlocks": [["n", "10.0.0.0/8"]]}],
                "operations": [{"ports": [8080], "paths": [["s", "prefix", "/api/", false]]}],
                "conditions": [{"key": "request.headers", "header": "x-user",
                                "values": [["s", "exact", "a", false]]}]}]}

A value is an int (ports), ``["s", kind, literal, ignore_case]`` (a string
pattern), ``["p", written, kind, literal]`` (a principal) or ``["n", cidr]``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from .canon import AUTHN_KIND, KIND, policy_set
from .model import (
    Action,
    ClaimToHeader,
    Condition,
    ConditionKey,
    HeaderLocation,
    JwtRule,
    MatchKind,
    Operation,
    Policy,
    PolicySet,
    PrincipalMatch,
    RequestAuthentication,
    Rule,
    Source,
    StringMatch,
)

__all__ = [
    "FORMAT",
    "COMPILED_FILE",
    "COMPILED_FORMAT",
    "CompiledError",
    "to_data",
    "from_data",
    "policies_to_data",
    "authentication_to_data",
]

#: Version of this shape; a reader refuses any other.
FORMAT = 1

#: The file the agent's policy store publishes in runDir for the proxy
#: workers (agent/proxy/authz.py reads it), and that file's own format.
COMPILED_FILE = "policies.json"
COMPILED_FORMAT = 1

_SOURCE_FIELDS = (
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "ip_blocks",
    "not_ip_blocks",
    "request_principals",
    "not_request_principals",
)
_OP_FIELDS = ("ports", "not_ports", "methods", "not_methods", "paths", "not_paths", "hosts", "not_hosts")
_JSON_NAMES = {
    "not_principals": "notPrincipals",
    "not_namespaces": "notNamespaces",
    "ip_blocks": "ipBlocks",
    "not_ip_blocks": "notIpBlocks",
    "not_ports": "notPorts",
    "not_methods": "notMethods",
    "not_paths": "notPaths",
    "not_hosts": "notHosts",
    "not_values": "notValues",
    "request_principals": "requestPrincipals",
    "not_request_principals": "notRequestPrincipals",
}


class CompiledError(ValueError):
    """The data is not a compiled policy set this release can read."""


def _enc(v: Any) -> Any:
    if isinstance(v, int):
        return v
    if isinstance(v, StringMatch):
        return ["s", v.kind._value_, v.value, v.ignore_case]  # _value_: no enum descriptor
    if isinstance(v, PrincipalMatch):
        return ["p", v.written, v.match.kind._value_, v.match.value]
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return ["n", str(v)]
    raise TypeError(f"cannot encode {v!r}")


_KINDS = {k.value: k for k in MatchKind}


def _dec(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    tag = v[0]
    if tag == "s":
        return StringMatch(_KINDS[v[1]], v[2], bool(v[3]))
    if tag == "p":
        return PrincipalMatch(v[1], StringMatch(_KINDS[v[2]], v[3]))
    if tag == "n":
        return ipaddress.ip_network(v[1])
    raise ValueError(f"unknown value tag {tag!r}")


def _fields(obj: Any, names: Sequence[str]) -> dict:
    out = {}
    for f in names:
        vals = getattr(obj, f)
        if vals:
            out[_JSON_NAMES.get(f, f)] = [_enc(v) for v in vals]
    return out


def _rule(r: Rule) -> dict:
    out: dict[str, Any] = {"origin": r.origin}
    if r.sources:
        out["sources"] = [_fields(s, _SOURCE_FIELDS) for s in r.sources]
    if r.operations:
        out["operations"] = [_fields(o, _OP_FIELDS) for o in r.operations]
    if r.conditions:
        out["conditions"] = [
            {
                "key": c.key._value_,
                "header": c.header,
                **({"claim": list(c.claim)} if c.claim else {}),
                **_fields(c, ("values", "not_values")),
            }
            for c in r.conditions
        ]
    return out


def to_data(p: Policy) -> dict:
    """One policy as plain data (see the module docstring)."""
    return {
        "namespace": p.namespace,
        "name": p.name,
        "action": p.action._value_,
        "selector": dict(p.selector),
        "apiVersion": p.api_version,
        "origin": p.origin,
        "rules": [_rule(r) for r in p.rules],
    }


def authentication_to_data(a: RequestAuthentication) -> dict:
    """One RequestAuthentication as plain data (``"kind"`` tells it from a policy)."""
    return {
        "kind": AUTHN_KIND,
        "namespace": a.namespace,
        "name": a.name,
        "selector": dict(a.selector),
        "apiVersion": a.api_version,
        "origin": a.origin,
        "jwtRules": [
            {
                "issuer": r.issuer,
                "audiences": list(r.audiences),
                "jwks": r.jwks,
                "jwksFile": r.jwks_file,
                "fromHeaders": [[h.name, h.prefix] for h in r.from_headers],
                "fromParams": list(r.from_params),
                "forwardOriginalToken": r.forward_original_token,
                "outputClaimToHeaders": [[c.header, c.claim] for c in r.output_claim_to_headers],
                "outputPayloadToHeader": r.output_payload_to_header,
                "clockSkew": r.clock_skew,
                "origin": r.origin,
            }
            for r in a.jwt_rules
        ],
    }


def _authentication(d: dict) -> RequestAuthentication:
    return RequestAuthentication(
        d["name"],
        d["namespace"],
        tuple(sorted(d["selector"].items())),
        tuple(
            JwtRule(
                issuer=r["issuer"],
                audiences=tuple(r["audiences"]),
                jwks=r["jwks"],
                jwks_file=r["jwksFile"],
                from_headers=tuple(HeaderLocation(n, p) for n, p in r["fromHeaders"]),
                from_params=tuple(r["fromParams"]),
                forward_original_token=bool(r["forwardOriginalToken"]),
                output_claim_to_headers=tuple(ClaimToHeader(h, c) for h, c in r["outputClaimToHeaders"]),
                output_payload_to_header=r["outputPayloadToHeader"],
                clock_skew=r.get("clockSkew"),
                origin=r.get("origin", ""),
            )
            for r in d["jwtRules"]
        ),
        api_version=d.get("apiVersion", "meshlet.io/v1alpha1"),
        origin=d.get("origin", ""),
    )


def policies_to_data(
    policies: Iterable[Policy], authentications: Iterable[RequestAuthentication] = ()
) -> list[dict]:
    return [to_data(p) for p in policies] + [authentication_to_data(a) for a in authentications]


def _read(d: dict, cls: type, names: Sequence[str]) -> Any:
    kw = {}
    for f in names:
        vals = d.get(_JSON_NAMES.get(f, f))
        if vals:
            kw[f] = tuple(_dec(v) for v in vals)
    return cls(**kw)


def _policy(d: dict) -> Policy:
    rules = []
    for r in d["rules"]:
        conds = tuple(
            Condition(
                ConditionKey(c["key"]),
                c.get("header"),
                tuple(_dec(v) for v in c.get("values", ())),
                tuple(_dec(v) for v in c.get("notValues", ())),
                claim=tuple(str(x) for x in c.get("claim", ())),
            )
            for c in r.get("conditions", ())
        )
        rules.append(
            Rule(
                tuple(_read(s, Source, _SOURCE_FIELDS) for s in r.get("sources", ())),
                tuple(_read(o, Operation, _OP_FIELDS) for o in r.get("operations", ())),
                conds,
                origin=r.get("origin", ""),
            )
        )
    return Policy(
        d["name"],
        d["namespace"],
        Action(d["action"]),
        tuple(sorted(d["selector"].items())),
        tuple(rules),
        api_version=d.get("apiVersion", "meshlet.io/v1alpha1"),
        origin=d.get("origin", ""),
    )


def from_data(
    policies: Sequence[dict], *, trust_domain: str, root_namespace: str, version: str, where: str = ""
) -> PolicySet:
    """The set :func:`to_data` wrote, checked against ``version`` (its
    fingerprint).  Raises :class:`CompiledError` saying what is wrong."""
    try:
        ps = policy_set(
            [_policy(d) for d in policies if d.get("kind", KIND) == KIND],
            trust_domain,
            root_namespace,
            (where,) if where else (),
            [_authentication(d) for d in policies if d.get("kind") == AUTHN_KIND],
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise CompiledError(f"{where or 'compiled policies'}: not a compiled policy set ({e!r})") from None
    if ps.version != version:
        raise CompiledError(
            f"{where or 'compiled policies'}: the compiled policies have version {ps.version}, "
            f"but the file says {version} (is the agent from the same release?)"
        )
    return ps
