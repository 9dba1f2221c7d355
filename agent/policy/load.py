"""Load AuthorizationPolicy documents from YAML files into a :class:`PolicySet`.

Pure apart from reading files: :func:`parse_policies` turns text into a
:class:`PolicySet` or raises :class:`~agent.yamlsrc.SourceError` listing every
problem as ``file:line:column: field.path: what was expected``;
:func:`load_policies` reads one file, a directory (its ``*.yaml``/``*.yml``
files, not recursive, sorted) or several paths, and checks across all of
them.

Accepted documents (several per file, separated by ``---``)::

    apiVersion: meshlet.io/v1alpha1      # or security.istio.io/v1, security.istio.io/v1beta1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: shop}   # both required
    spec:
      selector: {matchLabels: {app: backend}}       # absent or {}: every workload of the namespace
      action: DENY                                  # ALLOW (default), DENY, AUDIT
      rules:
      - from: [{source: {principals: [...], notPrincipals, namespaces, notNamespaces,
                         ipBlocks, notIpBlocks, requestPrincipals, notRequestPrincipals}}]
        to:   [{operation: {ports, notPorts, methods, notMethods, paths, notPaths,
                            hosts, notHosts}}]
        when: [{key: request.headers[x-user], values: [...], notValues: [...]}]

Fail closed, always:

- Unknown fields are errors; Istio fields meshlet does not implement
  (``remoteIpBlocks``, ``serviceAccounts``, ``targetRef(s)``, ``provider``,
  action ``CUSTOM``, path templates, ``when`` keys other than
  ``request.headers[...]``, ``source.*``, ``destination.port`` and
  ``request.auth.principal|audiences|presenter|claims[...]``) are errors
  that say so, never silently dropped.
- ``RequestAuthentication`` documents (end-user JWT rules, see
  agent/policy/jwtauth.py) are read here too, into ``PolicySet.authentications``;
  their JWKS is checked at load (key types, no symmetric or private keys).
- Istio's own validation rules apply: ``from``/``to`` must not be empty
  lists, ``source``/``operation`` must not be empty, a ``when`` needs
  ``values`` or ``notValues``, a DENY policy needs ``rules``, selectors have
  no wildcards.  Stricter than Istio: an empty value list (``ports: []``),
  which Istio reads as "not set", is an error here because it would widen
  the rule silently.
- Patterns that can never match what they are compared with are errors:
  a path that no normalized path can equal (``/a/../b``, ``//x``, ``%61``),
  an Istio principal in a form Istio would never match.
- ``metadata.namespace`` is required (kubectl would fill in the context's
  namespace; a file loader must not guess).  The same namespace/name twice,
  in any file, is an error.

Size: ~1,150 lines: one reader per section of the document (source, operation, condition,
and RequestAuthentication's jwtRules) and the patterns they share; splitting them would
scatter the fail-closed rules stated above.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode

from agent import yamlsrc as y
from agent.identity.spiffe import SpiffeId, SpiffeIdError, parse_spiffe_id
from agent.labels import selector_key, selector_value

from .canon import AUTHN_KIND, KIND, fingerprint, policy_set
from .http import path_pattern_problem
from .model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    ISTIO_DEFAULT_TRUST_DOMAIN,
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
    "MESHLET_API",
    "ISTIO_APIS",
    "API_VERSIONS",
    "load_policies",
    "parse_policies",
    "parse_documents",
    "parse_principal",
    "policy_files",
    "fingerprint",
    "parse_sources",
    "DocKind",
    "collect_documents",
    "authorization_kind",
    "policy_set",
    "read_sources",
    "AUTHN_KIND",
    "authentication_kind",
    "policy_kinds",
]

MESHLET_API = "meshlet.io/v1alpha1"
ISTIO_APIS = ("security.istio.io/v1", "security.istio.io/v1beta1")
API_VERSIONS = (MESHLET_API, *ISTIO_APIS)

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"

# Istio fields meshlet knows and refuses, with why (said in the error).
_UNSUPPORTED_SPEC = {
    "provider": "CUSTOM (external authorization) providers are not supported",
    "targetRef": "targetRef (gateway/waypoint attachment) is not supported; use selector",
    "targetRefs": "targetRefs (gateway/waypoint attachment) are not supported; use selector",
}
_UNSUPPORTED_SOURCE = {
    "remoteIpBlocks": "remoteIpBlocks (X-Forwarded-For) are not supported; use ipBlocks",
    "notRemoteIpBlocks": "notRemoteIpBlocks (X-Forwarded-For) are not supported; use notIpBlocks",
    "serviceAccounts": "serviceAccounts are not supported; use principals (ns/<ns>/sa/<sa>)",
    "notServiceAccounts": "notServiceAccounts are not supported; use notPrincipals",
}
_UNSUPPORTED_KEYS = ("remote.ip", "destination.ip", "connection.sni", "source.serviceAccount")
_UNSUPPORTED_KEY_PREFIXES = ("request.auth.", "experimental.")
_HEADER_KEY = re.compile(r"request\.headers\[(.*)\]", re.S)
_CLAIMS_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)", re.S)
_SUPPORTED_KEYS_TEXT = (
    "request.headers[<name>], source.ip, source.namespace, source.principal, destination.port, "
    "request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>]"
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAMESPACE_CHARS = re.compile(r"[a-z0-9-]*")
_PRINCIPAL_CHARS = re.compile(r"[A-Za-z0-9._/-]*")
_HOST_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()+,;=:\[\]]*")


# --------------------------------------------------------------------------
# Multi-document YAML on top of yamlsrc


def parse_documents(
    text: str, filename: str, kinds: Sequence[str] = (KIND,), noun: str = "policy"
) -> list[y.Document]:
    """Compose every ``---``-separated document of ``text``; null documents
    (a stray ``---``) are skipped.  Each document's root must be a mapping.
    ``kinds`` and ``noun`` only word the messages.

    Raises SourceError for YAML syntax errors and non-mapping documents, and
    for a file with no document at all."""

    def fail(line: int, column: int, message: str) -> y.SourceError:
        return y.SourceError([y.Problem(filename, line, column, "", message)])

    roots = [root for _, root in y.compose_all(text, filename)]

    docs: list[y.Document] = []
    problems: list[y.Problem] = []
    for root in roots:
        if isinstance(root, ScalarNode) and root.tag == _NULL_TAG:
            continue
        if not isinstance(root, MappingNode):
            line, column = y.position(root)
            problems.append(
                y.Problem(
                    filename,
                    line,
                    column,
                    "",
                    f"a {noun} document must be a mapping, got {y.describe_node(root)}",
                )
            )
            continue
        docs.append(y.Document(filename, root))
    if problems:
        raise y.SourceError(problems)
    if not docs:
        raise fail(1, 1, f"no policy documents in this file; expected {' or '.join(kinds)} documents")
    return docs


# --------------------------------------------------------------------------
# Patterns


def parse_principal(
    written: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, istio: bool = False
) -> PrincipalMatch:
    """A principal pattern (forms and trust-domain rules: agent.policy.model).

    Raises ValueError saying what is wrong."""
    if written == "*":
        return PrincipalMatch(written, StringMatch(MatchKind.PRESENCE, ""))
    literal_spiffe = False
    if written.startswith("spiffe://"):
        if istio:
            raise ValueError(
                f"{written!r}: Istio principals have no 'spiffe://' scheme; write "
                f"{written[9:]!r} (or use apiVersion {MESHLET_API})"
            )
        form, literal_spiffe = written[len("spiffe://") :], True
    elif written.startswith("ns/"):
        if istio:
            raise ValueError(
                f"{written!r}: Istio principals start with the trust domain; write "
                f"'cluster.local/{written}' (the short form is {MESHLET_API} only)"
            )
        form = f"{trust_domain}/{written}"
    else:
        form = written
    try:
        sm = StringMatch.parse(form)
    except ValueError as e:
        raise ValueError(str(e).replace(repr(form), repr(written))) from None
    parts = form.split("/")
    if (
        not literal_spiffe
        and len(parts) == 5
        and parts[0] == ISTIO_DEFAULT_TRUST_DOMAIN
        and trust_domain != ISTIO_DEFAULT_TRUST_DOMAIN
    ):
        # Istio: "cluster.local" in a principal stands for the mesh's own trust domain
        sm = StringMatch.parse("/".join([trust_domain, *parts[1:]]))
    if sm.kind is MatchKind.EXACT:
        try:
            parse_spiffe_id("spiffe://" + sm.value)
        except SpiffeIdError as e:
            raise ValueError(
                f"{written!r} is not a principal (<trust-domain>/ns/<namespace>/sa/<account>): {e}"
            ) from None
    elif not _PRINCIPAL_CHARS.fullmatch(sm.value) or "//" in sm.value:
        raise ValueError(
            f"{written!r}: principals use only letters, digits, '.', '-', '_' and single '/' between segments"
        )
    return PrincipalMatch(written, sm)


def _pattern(check: Callable[[StringMatch, str], str | None], *, ignore_case: bool = False):
    def conv(v: y.Value) -> StringMatch:
        s = y.string(v)
        if check is _path_check and ("{" in s or "}" in s):
            raise y.Invalid(f"{s!r}: path templates ('{{*}}', '{{**}}') are not supported")
        try:
            sm = StringMatch.parse(s, ignore_case=ignore_case)
        except ValueError as e:
            raise y.Invalid(str(e)) from None
        problem = check(sm, s)
        if problem:
            raise y.Invalid(problem)
        return sm

    return conv


def _namespace_check(sm: StringMatch, s: str) -> str | None:
    if not _NAMESPACE_CHARS.fullmatch(sm.value):
        return f"{s!r} is not a namespace pattern: namespaces use lower-case letters, digits and '-'"
    return None


def _method_check(sm: StringMatch, s: str) -> str | None:
    if sm.value and not _TOKEN.fullmatch(sm.value):
        return f"{s!r} is not an HTTP method (letters, no spaces)"
    return None


def _host_check(sm: StringMatch, s: str) -> str | None:
    if not _HOST_CHARS.fullmatch(sm.value):
        return f"{s!r} is not a host pattern (host[:port], no scheme, path or spaces)"
    return None


def _path_check(sm: StringMatch, s: str) -> str | None:
    if sm.kind is MatchKind.PRESENCE:
        return None
    problem = path_pattern_problem(sm.value, sm.kind.value)
    return f"{s!r} can never match a normalized path: {problem}" if problem else None


def _header_value_check(sm: StringMatch, s: str) -> str | None:
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in s):
        return "header values never contain control characters"
    return None


def _request_principal_check(sm: StringMatch, s: str) -> str | None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        return "request principals (<issuer>/<subject>) never contain control characters"
    return None


_request_principal = _pattern(_request_principal_check)


def _port(v: y.Value) -> int:
    """A port as Istio writes it ("8080") or as a number."""
    x = v.scalar()
    if isinstance(x, str) and x.isdigit() and x.isascii():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise y.Invalid(f"expected a port number, got {y.describe_node(v.node)} {v.node.value!r}")
    if not 1 <= x <= 65535:
        raise y.Invalid(f"{x} is not a port number (1..65535)")
    return x


def _principal(trust_domain: str, istio: bool):
    def conv(v: y.Value) -> PrincipalMatch:
        s = y.string(v)
        try:
            return parse_principal(s, trust_domain=trust_domain, istio=istio)
        except ValueError as e:
            raise y.Invalid(str(e)) from None

    return conv


def _values(conv):
    """A non-empty list, each item checked at its own position."""

    def convert(v: y.Value):
        if not v.is_null and v.node.tag == "tag:yaml.org,2002:seq" and not v.node.value:
            raise y.Invalid("an empty list would match anything; remove the field or list values")
        return y.list_of(conv, min_len=1)(v)

    return convert


def _string_map(v: y.Value) -> dict:
    return y.map_of(y.string, y.any_string)(v)


#: Annotations that change what a policy does; meshlet does not implement
#: them, and ignoring one would enforce a policy its author did not mean to.
_UNSUPPORTED_ANNOTATIONS = {
    "istio.io/dry-run": "dry-run policies are not supported: meshlet would enforce this policy; "
    "remove it, or use action: AUDIT to log without enforcing",
}


def _annotations(v: y.Value) -> dict:
    out = _string_map(v)
    for key, why in _UNSUPPORTED_ANNOTATIONS.items():
        if key in out:
            raise y.Invalid(f"{key}: {why}")
    return out


def _metadata(doc: Any, top: Any, meta_v: Any, annotations: Any) -> tuple[str | None, str | None]:
    """A policy document's metadata: (name, namespace), None where missing or
    invalid (the error is added to ``doc`` with its line).  ``annotations``
    checks the annotations (an AuthorizationPolicy refuses Istio's dry-run)."""
    meta = top.section("metadata") if meta_v is not None else None
    if meta_v is None:
        doc.add_at(top.value.node, "metadata", "required field is missing (name and namespace)")
        return None, None
    if meta is None:
        return None, None
    name = meta.get("name", y.dns_subdomain)
    namespace = meta.get("namespace", y.dns_label)
    meta.get("labels", _string_map, None)
    meta.get("annotations", annotations, None)
    meta.finish()
    return name, namespace


# --------------------------------------------------------------------------
# Documents


class _Ctx:
    def __init__(self, trust_domain: str, istio: bool):
        self.trust_domain = trust_domain
        self.istio = istio
        self.principal = _principal(trust_domain, istio)


def _where(v: y.Value) -> str:
    return f"{v.doc.filename}:{v.line}:{v.column}"


def _refuse(r: y.MapReader, table: dict[str, str]) -> None:
    """Report fields meshlet knows it does not implement, with the reason."""
    for key, why in table.items():
        kv = r.key_at(key)
        if kv is not None:
            r.at(key)  # asked for, so finish() does not call it unknown as well
            kv.problem(why)


def _read_document(doc: y.Document, trust_domain: str) -> Policy | None:
    top = doc.top()
    before = len(doc.problems)
    api = top.get("apiVersion", y.enum(*API_VERSIONS))
    kind = top.get("kind", y.enum(KIND))
    meta_v, spec_v = top.at("metadata"), top.at("spec")
    top.finish()
    if api is None or kind is None:
        return None  # not a document we read: its fields would only add noise
    name, namespace = _metadata(doc, top, meta_v, _annotations)
    ctx = _Ctx(trust_domain, api in ISTIO_APIS)
    # an absent spec reads like "spec: {}": an ALLOW policy that allows nothing
    spec = spec_v.convert(y.Value.mapping) if spec_v is not None else None
    action: Action = Action.ALLOW
    selector: tuple[tuple[str, str], ...] = ()
    rules: tuple[Rule, ...] = ()
    if spec is not None:
        _refuse(spec, _UNSUPPORTED_SPEC)
        sel = spec.section("selector")
        labels: dict[str, str] = {}
        if sel is not None:
            labels = sel.get("matchLabels", y.map_of(selector_key, selector_value), {}) or {}
            sel.finish()
        selector = tuple(sorted(labels.items()))
        act = spec.get("action", y.enum("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
        if act == "CUSTOM":
            (spec.at("action") or spec.value).problem(
                "action CUSTOM (external authorization) is not supported; use ALLOW, DENY or AUDIT"
            )
        elif act is not None:
            action = Action(act)
        rules_v = spec.at("rules")
        spec.finish()
        items = rules_v.convert(y.Value.items) if rules_v is not None else []
        rules = tuple(r for r in (_read_rule(i, ctx) for i in (items or [])) if r is not None)
        if action is Action.DENY and items == []:
            where = rules_v.node if rules_v is not None else spec.value.node
            doc.add_at(
                where,
                f"{spec.path}.rules",
                "a DENY policy without rules never matches; add the rules, or an empty "
                "rule {} to deny everything",
            )
    if len(doc.problems) != before or name is None or namespace is None:
        return None
    return Policy(
        name=name,
        namespace=namespace,
        action=action,
        selector=selector,
        rules=rules,
        api_version=api,
        origin=_where(top.value),
    )


def _list_of_maps(v: y.Value, what: str) -> list[y.MapReader]:
    items = v.convert(y.Value.items)
    if items is None:
        return []
    if not items:
        v.problem(
            f"`{what}` must not be an empty list; remove it to match any "
            + {"from": "source", "to": "operation", "when": "request"}[what]
        )
        return []
    return [r for r in (i.convert(y.Value.mapping) for i in items) if r is not None]


def _read_rule(item: y.Value, ctx: _Ctx) -> Rule | None:
    r = item.convert(y.Value.mapping)
    if r is None:
        return None
    before = len(r.doc.problems)
    from_v, to_v, when_v = r.at("from"), r.at("to"), r.at("when")
    r.finish()
    sources: list[Source] = []
    operations: list[Operation] = []
    conditions: list[Condition] = []
    if from_v is not None:
        for fr in _list_of_maps(from_v, "from"):
            src = _read_wrapped(fr, "source", _read_source, ctx)
            if src is not None:
                sources.append(src)
    if to_v is not None:
        for tr in _list_of_maps(to_v, "to"):
            op = _read_wrapped(tr, "operation", _read_operation, ctx)
            if op is not None:
                operations.append(op)
    if when_v is not None:
        for wr in _list_of_maps(when_v, "when"):
            c = _read_condition(wr, ctx)
            if c is not None:
                conditions.append(c)
    if len(r.doc.problems) != before:
        return None
    return Rule(tuple(sources), tuple(operations), tuple(conditions), origin=_where(item))


def _read_wrapped(r: y.MapReader, key: str, read, ctx: _Ctx):
    inner_v = r.at(key)
    r.finish()
    if inner_v is None:
        r.doc.add_at(r.value.node, f"{r.path}.{key}", f"`{key}` is required and must not be empty")
        return None
    inner = inner_v.convert(y.Value.mapping)
    if inner is None:
        return None
    if not inner.entries:
        inner_v.problem(f"`{key}` must not be empty; remove the whole entry to match any {key}")
        return None
    return read(inner, ctx)


def _read_source(s: y.MapReader, ctx: _Ctx) -> Source | None:
    before = len(s.doc.problems)
    _refuse(s, _UNSUPPORTED_SOURCE)
    ns = _pattern(_namespace_check)
    src = Source(
        principals=s.get("principals", _values(ctx.principal), ()),
        not_principals=s.get("notPrincipals", _values(ctx.principal), ()),
        namespaces=s.get("namespaces", _values(ns), ()),
        not_namespaces=s.get("notNamespaces", _values(ns), ()),
        ip_blocks=s.get("ipBlocks", _values(y.ip_network), ()),
        not_ip_blocks=s.get("notIpBlocks", _values(y.ip_network), ()),
        request_principals=s.get("requestPrincipals", _values(_request_principal), ()),
        not_request_principals=s.get("notRequestPrincipals", _values(_request_principal), ()),
    )
    s.finish()
    return None if len(s.doc.problems) != before else src


def _read_operation(o: y.MapReader, ctx: _Ctx) -> Operation | None:
    before = len(o.doc.problems)
    method, path = _pattern(_method_check), _pattern(_path_check)
    host = _pattern(_host_check, ignore_case=True)
    op = Operation(
        ports=o.get("ports", _values(_port), ()),
        not_ports=o.get("notPorts", _values(_port), ()),
        methods=o.get("methods", _values(method), ()),
        not_methods=o.get("notMethods", _values(method), ()),
        paths=o.get("paths", _values(path), ()),
        not_paths=o.get("notPaths", _values(path), ()),
        hosts=o.get("hosts", _values(host), ()),
        not_hosts=o.get("notHosts", _values(host), ()),
    )
    o.finish()
    return None if len(o.doc.problems) != before else op


def _condition_key(v: y.Value) -> tuple[ConditionKey, Any]:
    k = y.string(v)
    m = _HEADER_KEY.fullmatch(k)
    if m:
        name = m.group(1)
        if not _TOKEN.fullmatch(name):
            raise y.Invalid(f"{name!r} is not a header name")
        return ConditionKey.REQUEST_HEADER, name.lower()
    m = _CLAIMS_KEY.fullmatch(k)
    if m:
        path = tuple(m.group(1)[1:-1].split("]["))
        return ConditionKey.AUTH_CLAIMS, path
    for ck in ConditionKey:
        if ck not in (ConditionKey.REQUEST_HEADER, ConditionKey.AUTH_CLAIMS) and k == ck.value:
            return ck, None
    if k == ConditionKey.AUTH_CLAIMS.value:
        raise y.Invalid(
            "request.auth.claims needs a claim name: request.auth.claims[<name>] (nested: [a][b])"
        )
    if k in _UNSUPPORTED_KEYS or k.startswith(_UNSUPPORTED_KEY_PREFIXES):
        raise y.Invalid(f"`when` key {k!r} is not supported by meshlet; supported: {_SUPPORTED_KEYS_TEXT}")
    hint = y.did_you_mean(
        k, [c.value for c in ConditionKey if c not in (ConditionKey.REQUEST_HEADER, ConditionKey.AUTH_CLAIMS)]
    )
    raise y.Invalid(
        f"unknown `when` key {k!r}"
        + (f" (did you mean {hint!r}?)" if hint else f"; supported: {_SUPPORTED_KEYS_TEXT}")
    )


def _read_condition(w: y.MapReader, ctx: _Ctx) -> Condition | None:
    before = len(w.doc.problems)
    key = w.get("key", _condition_key)
    conv: Any = None
    if key is not None:
        conv = {
            ConditionKey.REQUEST_HEADER: _pattern(_header_value_check),
            ConditionKey.SOURCE_IP: y.ip_network,
            ConditionKey.SOURCE_NAMESPACE: _pattern(_namespace_check),
            ConditionKey.SOURCE_PRINCIPAL: ctx.principal,
            ConditionKey.DESTINATION_PORT: _port,
            ConditionKey.AUTH_PRINCIPAL: _request_principal,
            ConditionKey.AUTH_AUDIENCES: _pattern(_header_value_check),
            ConditionKey.AUTH_PRESENTER: _pattern(_header_value_check),
            ConditionKey.AUTH_CLAIMS: _pattern(_header_value_check),
        }[key[0]]
        values = w.get("values", _values(conv), ())
        not_values = w.get("notValues", _values(conv), ())
    else:
        w.at("values")
        w.at("notValues")
        values = not_values = ()
    w.finish()
    if key is not None and not w.has("values") and not w.has("notValues") and len(w.doc.problems) == before:
        w.doc.add_at(w.value.node, w.path, "a `when` condition needs `values` or `notValues`")
    if len(w.doc.problems) != before or key is None:
        return None
    if key[0] is ConditionKey.AUTH_CLAIMS:
        return Condition(key[0], None, values or (), not_values or (), claim=key[1])
    return Condition(key[0], key[1], values or (), not_values or ())


# --------------------------------------------------------------------------
# RequestAuthentication

_FORBIDDEN_OUTPUT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "authorization",
        "cookie",
    }
)


def _header_name(v: y.Value) -> str:
    s = y.string(v)
    if not _TOKEN.fullmatch(s):
        raise y.Invalid(f"{s!r} is not a header name")
    return s.lower()


def _output_header(v: y.Value) -> str:
    name = _header_name(v)
    if name in _FORBIDDEN_OUTPUT_HEADERS:
        raise y.Invalid(
            f"{name!r} cannot be set from a token: it frames, routes or authenticates the request"
        )
    return name


def _jwks_text(v: y.Value) -> str:
    from .jwtauth import JwksError, parse_jwks  # PyJWT is imported only when a JWKS is read

    s = y.string(v)
    try:
        parse_jwks(s)
    except JwksError as e:
        raise y.Invalid(f"jwks: {e}") from None
    return json.dumps(json.loads(s), sort_keys=True, separators=(",", ":"))


def _param_name(v: y.Value) -> str:
    s = y.string(v)
    if any(c in s for c in "&=#? ") or any(ord(c) < 0x20 for c in s):
        raise y.Invalid(f"{s!r} is not a query parameter name")
    return s


def _read_location(r: y.MapReader) -> HeaderLocation | None:
    before = len(r.doc.problems)
    name = r.get("name", _header_name)
    prefix = r.get("prefix", y.any_string, "")
    r.finish()
    if len(r.doc.problems) != before or name is None:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        r.value.problem("prefix: header values never contain control characters")
        return None
    return HeaderLocation(name, prefix)


def _read_claim_header(r: y.MapReader) -> ClaimToHeader | None:
    before = len(r.doc.problems)
    header = r.get("header", _output_header)
    claim = r.get("claim", y.string)
    r.finish()
    if len(r.doc.problems) != before or header is None or claim is None:
        return None
    return ClaimToHeader(header, claim)


def _maps(v: y.Value | None, read) -> tuple:
    if v is None:
        return ()
    items = v.convert(y.Value.items)
    if items is None:
        return ()
    if not items:
        v.problem("an empty list; remove the field")
        return ()
    out = []
    for i in items:
        m = i.convert(y.Value.mapping)
        if m is not None:
            got = read(m)
            if got is not None:
                out.append(got)
    return tuple(out)


def _read_jwt_rule(item: y.Value, istio: bool) -> JwtRule | None:
    r = item.convert(y.Value.mapping)
    if r is None:
        return None
    before = len(r.doc.problems)
    issuer = r.get("issuer", y.string)
    audiences = r.get("audiences", _values(y.string), ())
    jwks = r.get("jwks", _jwks_text, "")
    uri_v = r.at("jwksUri")
    file_v = r.at("jwksFile")
    jwks_file = ""
    if uri_v is not None:
        uri = uri_v.convert(y.string)
        if uri is not None:
            if uri.startswith("file:///"):
                jwks_file = uri[len("file://") :]
            else:
                uri_v.problem(
                    "meshlet does not fetch keys over the network: give them inline (jwks), as a "
                    "file:///absolute/path URI, or (apiVersion meshlet.io/v1alpha1) as jwksFile"
                )
    if file_v is not None:
        if istio:
            file_v.problem(
                f"jwksFile is a {MESHLET_API} field; in an Istio document write jwksUri: file:///path"
            )
        else:
            jwks_file = file_v.convert(y.absolute_path) or ""
    from_headers = _maps(r.at("fromHeaders"), _read_location)
    from_params = r.get("fromParams", _values(_param_name), ())
    fwd = r.get("forwardOriginalToken", y.boolean, False)
    claims = _maps(r.at("outputClaimToHeaders"), _read_claim_header)
    payload_header = r.get("outputPayloadToHeader", _output_header, "")
    skew = None
    skew_v = r.at("clockSkewSeconds")
    if skew_v is not None:
        if istio:
            skew_v.problem(f"clockSkewSeconds is a {MESHLET_API} field")
        else:
            skew = skew_v.convert(y.integer(0, 3600))
    for unsupported, why in (
        ("fromCookies", "fromCookies is not supported; use fromHeaders or fromParams"),
        ("timeout", "timeout applies to fetching jwksUri over the network, which meshlet does not do"),
    ):
        kv = r.key_at(unsupported)
        if kv is not None:
            r.at(unsupported)
            kv.problem(why)
    r.finish()
    given = [n for n, x in (("jwks", jwks), ("jwksUri", uri_v), ("jwksFile", file_v)) if x]
    if len(r.doc.problems) == before:
        if not given:
            r.doc.add_at(
                r.value.node,
                r.path,
                "no keys: give jwks (inline JSON) or jwksFile (meshlet does not discover keys "
                "from the issuer over the network)",
            )
        elif len(given) > 1:
            r.doc.add_at(
                r.value.node, r.path, f"give one of jwks, jwksUri, jwksFile, not {' and '.join(given)}"
            )
    if len(r.doc.problems) != before or issuer is None:
        return None
    outs = [c.header for c in claims] + ([payload_header] if payload_header else [])
    locs = {loc.name for loc in from_headers} | (
        {"authorization"} if not from_headers and not from_params else set()
    )
    clash = sorted(set(outs) & locs)
    if clash:
        r.doc.add_at(
            r.value.node, r.path, f"header {clash[0]!r} is both a token location and an output header"
        )
        return None
    if len(set(outs)) != len(outs):
        r.doc.add_at(r.value.node, r.path, "the same output header is set twice")
        return None
    return JwtRule(
        issuer=issuer,
        audiences=tuple(audiences or ()),
        jwks=jwks or "",
        jwks_file=jwks_file,
        from_headers=from_headers,
        from_params=tuple(from_params or ()),
        forward_original_token=bool(fwd),
        output_claim_to_headers=claims,
        output_payload_to_header=payload_header or "",
        clock_skew=float(skew) if skew is not None else None,
        origin=_where(item),
    )


def _read_authentication(doc: y.Document) -> RequestAuthentication | None:
    top = doc.top()
    before = len(doc.problems)
    api = top.get("apiVersion", y.enum(*API_VERSIONS))
    kind = top.get("kind", y.enum(AUTHN_KIND))
    meta_v, spec_v = top.at("metadata"), top.at("spec")
    top.finish()
    if api is None or kind is None:
        return None
    name, namespace = _metadata(doc, top, meta_v, _string_map)
    selector: tuple[tuple[str, str], ...] = ()
    rules: list[JwtRule] = []
    spec = spec_v.convert(y.Value.mapping) if spec_v is not None else None
    if spec is not None:
        _refuse(
            spec,
            {
                "targetRef": "targetRef (gateway/waypoint attachment) is not supported; use selector",
                "targetRefs": "targetRefs (gateway/waypoint attachment) are not supported; use selector",
            },
        )
        sel = spec.section("selector")
        if sel is not None:
            labels = sel.get("matchLabels", y.map_of(selector_key, selector_value), {}) or {}
            sel.finish()
            selector = tuple(sorted(labels.items()))
        rules_v = spec.at("jwtRules")
        spec.finish()
        if rules_v is not None:
            items = rules_v.convert(y.Value.items)
            if items == []:
                rules_v.problem(
                    "an empty list; remove the field (a RequestAuthentication without rules does nothing)"
                )
            for i in items or []:
                rule = _read_jwt_rule(i, api in ISTIO_APIS)
                if rule is not None:
                    rules.append(rule)
    if len(doc.problems) != before or name is None or namespace is None:
        return None
    return RequestAuthentication(
        name=name,
        namespace=namespace,
        selector=selector,
        jwt_rules=tuple(rules),
        api_version=api,
        origin=_where(top.value),
    )


# --------------------------------------------------------------------------
# Sets


def _check_options(trust_domain: str, root_namespace: str) -> None:
    SpiffeId(trust_domain, "")  # raises SpiffeIdError (a ValueError) if invalid
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", root_namespace) or len(root_namespace) > 63:
        raise ValueError(f"root namespace {root_namespace!r} is not a namespace name")


# --------------------------------------------------------------------------
# The shared collector: every kind of policy document goes through it


@dataclasses.dataclass(frozen=True)
class DocKind:
    """How :func:`collect_documents` reads one ``kind`` of document."""

    kind: str
    """The ``kind:`` value, e.g. ``AuthorizationPolicy``."""
    label: str
    """How messages name one, e.g. ``policy``, ``traffic policy``."""
    read: Callable[[y.Document], Any]
    """Reads one document into an object with ``namespace``, ``name``, ``key``
    and ``origin``; returns None after recording problems on the document."""
    conflict: Callable[[Any, y.Document, Sequence[Any]], bool] | None = None
    """Cross-document check against the objects of this kind accepted so far:
    records a problem on the document and returns True to refuse the object."""
    # For kinds the agent's store (agent.policy.store) holds besides
    # AuthorizationPolicy, and publishes in runDir for the proxies:
    published: str = ""
    """The runDir file the proxies read, e.g. ``traffic.json``."""
    compile: Callable[[tuple[Any, ...], str], dict] | None = None
    """(objects, their stored YAML text) -> the published JSON document; it
    has at least ``version`` (a fingerprint of the meaning) and ``count``."""
    summary: Callable[[Any], dict] | None = None
    """One object as a row of ``meshlet policy list``."""


def _kind_of(doc: y.Document, kinds: Sequence[DocKind]) -> DocKind | None:
    """The reader for ``doc``.  With one kind, always that one (its reader
    reports a wrong ``kind``).  With several, a missing or unknown ``kind`` is
    recorded here and None returned: reading on would only add noise."""
    if len(kinds) == 1:
        return kinds[0]
    names = [k.kind for k in kinds]
    assert doc.root is not None
    for knode, vnode in doc.root.value:
        if isinstance(knode, ScalarNode) and knode.value == "kind":
            if isinstance(vnode, ScalarNode):
                for k in kinds:
                    if vnode.value == k.kind:
                        return k
            shown = vnode.value if isinstance(vnode, ScalarNode) else "..."
            hint = y.did_you_mean(str(shown), names)
            doc.add_at(
                vnode,
                "kind",
                f"{shown!r} is not one of: {', '.join(names)}"
                + (f" (did you mean {hint!r}?)" if hint else ""),
            )
            return None
    doc.add_at(doc.root, "kind", f"required field is missing (one of: {', '.join(names)})")
    return None


def collect_documents(
    texts: Sequence[tuple[str, str]],
    kinds: Sequence[DocKind],
    *,
    noun: str = "policy",
    plain: list[Any] | None = None,
) -> dict[str, tuple[Any, ...]]:
    """Read every document of every ``(filename, text)`` pair with the reader
    of its ``kind``; check across all of them that no ``namespace/name`` of a
    kind comes twice (and each kind's own ``conflict``).  Returns the objects
    per kind, ordered by (namespace, name).  Raises SourceError listing every
    problem of every file, sorted by position.

    ``plain``: a list that gets, when everything is valid, every document as
    plain Python data (what ``yaml.safe_load`` gives), in file and document
    order, made from the nodes already composed (the text is not parsed
    again)."""
    with y.gc_paused():  # a large set builds a big tree of small objects (see yamlsrc)
        return _collect_documents(texts, kinds, noun, plain)


def _plain(node: Any, ctor: Any) -> Any:
    """A composed node as plain data; aliases were bounded by the composer,
    depth by MAX_DEPTH, and the document was validated (hashable keys)."""
    if isinstance(node, ScalarNode):
        return node.value if node.tag == _STR_TAG else ctor.construct_object(node, deep=True)
    if isinstance(node, MappingNode):
        return {_plain(k, ctor): _plain(v, ctor) for k, v in node.value}
    return [_plain(n, ctor) for n in node.value]


def _collect_documents(
    texts: Sequence[tuple[str, str]], kinds: Sequence[DocKind], noun: str, plain: list[Any] | None
) -> dict[str, tuple[Any, ...]]:
    roots: list[Any] = []
    problems: list[y.Problem] = []
    found: dict[str, list[Any]] = {k.kind: [] for k in kinds}
    seen: dict[tuple[str, str, str], Any] = {}
    names = [k.kind for k in kinds]
    for filename, text in texts:
        try:
            docs = parse_documents(text, filename, names, noun)
        except y.SourceError as e:
            problems += e.errors
            continue
        for doc in docs:
            roots.append(doc.root)
            dk = _kind_of(doc, kinds)
            obj = None
            if dk is not None:
                try:
                    obj = dk.read(doc)
                except RecursionError:
                    doc.add(0, 0, "", "YAML is nested too deeply")
            if obj is not None and dk is not None:
                first = seen.get((dk.kind, obj.namespace, obj.name))
                if first is not None:
                    meta = doc.top().at("metadata")
                    at = meta.mapping().at("name") if meta is not None else None
                    (at or doc.top().value).problem(
                        f"{dk.label} {obj.key} is defined twice (first at {first.origin})"
                    )
                elif dk.conflict is None or not dk.conflict(obj, doc, found[dk.kind]):
                    seen[(dk.kind, obj.namespace, obj.name)] = obj
                    found[dk.kind].append(obj)
            problems += doc.problems
    if problems:
        raise y.SourceError(sorted(problems, key=lambda p: (p.file, p.line, p.column)))
    if plain is not None:
        ctor = yaml.SafeLoader("")  # only its scalar constructors are used
        plain += [_plain(r, ctor) for r in roots]
    return {k: tuple(sorted(v, key=lambda o: (o.namespace, o.name))) for k, v in found.items()}


def authorization_kind(trust_domain: str = DEFAULT_TRUST_DOMAIN) -> DocKind:
    return DocKind(KIND, "policy", lambda doc: _read_document(doc, trust_domain))


def authentication_kind() -> DocKind:
    """RequestAuthentication: read with the authorization policies, kept in
    the same :class:`PolicySet` (and so in ``policies.json``)."""
    return DocKind(AUTHN_KIND, "request authentication", _read_authentication)


def policy_kinds(trust_domain: str = DEFAULT_TRUST_DOMAIN) -> list[DocKind]:
    """The kinds a :class:`PolicySet` is made of: AuthorizationPolicy and RequestAuthentication."""
    return [authorization_kind(trust_domain), authentication_kind()]


def _collect(texts: Sequence[tuple[str, str]], trust_domain: str, root_namespace: str) -> PolicySet:
    _check_options(trust_domain, root_namespace)
    got = collect_documents(texts, policy_kinds(trust_domain))
    return policy_set(
        got[KIND],
        trust_domain,
        root_namespace,
        tuple(dict.fromkeys(f for f, _ in texts)),
        got[AUTHN_KIND],
    )


def parse_policies(
    text: str,
    filename: str = "<policy>",
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> PolicySet:
    """Policies from one YAML text.  Raises SourceError listing every problem."""
    return _collect([(filename, text)], trust_domain, root_namespace)


def parse_sources(
    texts: Sequence[tuple[str, str]],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> PolicySet:
    """Policies from several ``(filename, text)`` pairs, checked across all of
    them as :func:`load_policies` does for files.  Raises SourceError."""
    return _collect(list(texts), trust_domain, root_namespace)


def policy_files(path: str | os.PathLike[str]) -> list[str]:
    """The files :func:`load_policies` reads for ``path`` (a file or a directory)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return [
            os.path.join(p, n)
            for n in sorted(os.listdir(p))
            if not n.startswith(".") and n.endswith((".yaml", ".yml")) and os.path.isfile(os.path.join(p, n))
        ]
    return [p]


def read_sources(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    collect: Callable[[list[tuple[str, str]]], Any],
) -> Any:
    """Read files and directories (see :func:`policy_files`) and hand their
    ``(filename, text)`` pairs to ``collect``; problems reading files and
    problems ``collect`` raises come out together, as one SourceError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts: list[tuple[str, str]] = []
    problems: list[y.Problem] = []
    for path in paths:
        files = policy_files(path)
        if not files:
            problems.append(y.Problem(os.fspath(path), 0, 0, "", "directory has no .yaml or .yml files"))
        for f in files:
            try:
                texts.append((f, y.read_text(f)))
            except y.SourceError as e:
                problems += e.errors
    result = None
    try:
        result = collect(texts)
    except y.SourceError as e:
        problems += e.errors
    if problems:
        raise y.SourceError(sorted(problems, key=lambda p: (p.file, p.line, p.column)))
    return result


def load_policies(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> PolicySet:
    """Read files and directories into one :class:`PolicySet` (checked across files)."""
    return read_sources(paths, lambda texts: _collect(texts, trust_domain, root_namespace))
