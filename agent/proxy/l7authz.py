"""Per-request authorization for the L7 path (pure: no sockets).

The destination-side proxy decides each connection first as TCP
(``authz.authorize``).  When it serves the connection as HTTP it decides
each request too, with the whole rule (methods, paths, hosts, headers):

- If the connection was **allowed** as TCP, every request is allowed as
  well, so requests are not evaluated (the fast path): a TCP allow comes
  from an ALLOW rule without HTTP fields (ALLOW rules with HTTP fields never
  match TCP) and from no DENY rule matching even with its HTTP fields
  dropped — and HTTP fields only narrow a rule.  AUDIT policies with HTTP
  fields are the exception: they still need each request, to be logged.
- If the connection was **denied** as TCP, each request is decided on its
  own: ``DENY /admin`` denies the connection as TCP (Istio drops a DENY
  rule's HTTP fields on non-HTTP traffic) but only ``/admin`` requests when
  the traffic is HTTP.

The policy set can change while a keep-alive connection lives; the
authorizer notices (by version) and re-derives its fast path, so the next
request is decided by the policy in force.

Evaluated requests are remembered per connection, keyed by (method, path,
Host as sent), while that is all a decision can depend on: the connection's
own attributes are fixed, and no applying rule reads a request header
(``when: request.headers[...]``) and no JWT rule applies (so there is no
``request.auth``).  The memo belongs to one policy set object: any other set
(a reload) empties it before the next request is decided.  A keep-alive
client mostly repeats a few paths, so most of its requests skip evaluation.

A denied request gets ``403`` with ``RBAC: access denied`` (the words
Envoy-based meshes use, so existing client handling recognizes it) and the
connection stays open.  A request whose Host cannot be normalized was
already refused by the parser; if it reaches here anyway it gets ``400``.

End-user authentication (RequestAuthentication) runs first, on every
request of a workload that JWT rules select, fast path or not: it is the
pure :func:`agent.policy.jwtauth.authenticate` of (headers, query, rules,
now).  An invalid token is refused with ``401`` and ``WWW-Authenticate:
Bearer ...``; no token goes on to policy without a request principal; a
valid one gives policy ``request.auth.*``.  What the request must look like
when forwarded (token removed, claim headers set, client copies of them
dropped) is left in :attr:`RequestAuthorizer.authn` for the caller, which
owns the request head (HTTP/1.1 here; an HTTP/2 stream the same way).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.identity.spiffe import SpiffeIdError, parse_spiffe_id
from agent.policy.evaluate import Decision, Request, evaluate, workload_index
from agent.policy.http import HttpError, header_multimap, normalize_host
from agent.policy.jwtauth import (
    DEFAULT_CLOCK_SKEW,
    NO_TOKEN,
    AuthnResult,
    JwksError,
    KeySet,
    authenticate,
    cached_jwks,
    www_authenticate,
)
from agent.policy.model import ConditionKey, JwtRule, PolicySet

__all__ = ["DENIED_BODY", "Denial", "RequestAuthorizer"]

DENIED_BODY = b"RBAC: access denied"

#: Decisions one connection remembers (module docstring); emptied when full.
DECISION_MEMO_SIZE = 256


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request was refused: the HTTP status to send and the decision."""

    status: int
    reason: str
    decision: Decision | None = None  # None: refused before policy (bad Host, bad token)
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """Headers of the refusal (401: ``WWW-Authenticate``)."""


_NO_HEADERS: Mapping[str, tuple[str, ...]] = MappingProxyType({})


class RequestAuthorizer:
    """Decides the requests of one destination-side connection.

    ``policies()`` returns the policy set in force (read on every request,
    so a reload applies to the next request); ``tcp_allowed`` is how the
    connection itself was decided."""

    def __init__(
        self,
        policies: Callable[[], PolicySet],
        *,
        identity: str | None,
        src_ip: str | None,
        namespace: str,
        labels: dict[str, str],
        port: int,
        tcp_allowed: bool,
        jwks_file: Callable[[str], KeySet | None] | None = None,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policies = policies
        self._jwks_file = jwks_file
        self.clock_skew = clock_skew
        self._clock = clock
        self._jwt: tuple[JwtRule, ...] = ()
        self.authn: AuthnResult = NO_TOKEN
        """The last request's authentication: what to change before forwarding it."""
        self.namespace = namespace
        self.labels = labels
        self.port = port
        self.tcp_allowed = tcp_allowed
        self._version: str | None = None
        self._base: Request | None = None  # the connection as a Request (HTTP fields added per request)
        self._needed = True
        self._memo: dict[tuple[bytes, str, bytes | None], Decision] | None = None
        """(method, path, raw Host) -> decision, under ``self._memo_set``; None: not memoizable."""
        self._memo_set: PolicySet | None = None
        self.principal = None
        if identity:
            try:
                self.principal = parse_spiffe_id(identity)
            except SpiffeIdError:
                self.principal = None
        self.ip = None
        if src_ip:
            try:
                self.ip = ipaddress.ip_address(src_ip)
            except ValueError:
                self.ip = None

    def _refresh(self, ps: PolicySet) -> None:
        """Whether requests must be evaluated under this policy set."""
        self._version = ps.version
        wi = workload_index(ps, self.namespace, self.labels)
        self._jwt = wi.jwt_rules
        self._memo_set = ps
        headers_read = any(
            c.key is ConditionKey.REQUEST_HEADER for p in wi.policies for r in p.rules for c in r.conditions
        )
        self._memo = None if self._jwt or headers_read else {}
        if not self.tcp_allowed:
            self._needed = True
            return
        # Was the connection allowed by THIS set? (It was decided under an older one.)
        tcp = evaluate(
            ps,
            Request(
                destination_namespace=self.namespace,
                destination_labels=self.labels,
                destination_port=self.port,
                source_principal=self.principal,
                source_ip=self.ip,
            ),
        )
        self._needed = not tcp.allowed or workload_index(ps, self.namespace, self.labels).audit_l7

    def _keys(self, rule: JwtRule) -> KeySet | None:
        if rule.jwks:
            try:
                return cached_jwks(rule.jwks)
            except JwksError:
                return None  # the loader checked it; a JWKS that does not load verifies nothing
        if rule.jwks_file and self._jwks_file is not None:
            return self._jwks_file(rule.jwks_file)
        return None

    def decide(
        self,
        method: bytes,
        path: str,
        host: bytes | None,
        headers: list[tuple[bytes, bytes]],
        query: str | None = None,
        now: float | None = None,
    ) -> Decision | Denial | None:
        """None: allowed without evaluation (fast path); a Decision (allowed or
        not, maybe with AUDIT matches); or a Denial for a request that cannot
        be evaluated (401: an invalid token).  ``query``: the request's query
        (a token may be there); ``now``: the time for the token's exp/nbf/iat
        (default: the clock).  Afterwards :attr:`authn` says what to change
        in the forwarded request."""
        ps = self._policies()
        if ps.version != self._version or ps is not self._memo_set:
            self._refresh(ps)
        auth = None
        if self._jwt:
            a = self.authn = authenticate(
                headers,
                query,
                self._jwt,
                self._clock() if now is None else now,
                self._keys,
                clock_skew=self.clock_skew,
            )
            if not a.ok:
                return Denial(401, a.reason, None, ((b"WWW-Authenticate", www_authenticate(a.reason)),))
            auth = a.auth
        else:
            self.authn = NO_TOKEN
        if not self._needed:
            return None
        memo = self._memo
        if memo is not None:
            d = memo.get((method, path, host))
            if d is not None:
                return d
        try:
            norm_host = normalize_host(host) if host is not None else None
        except HttpError as e:
            return Denial(400, e.reason)
        base = self._base
        if base is None:
            base = self._base = Request(
                destination_namespace=self.namespace,
                destination_labels=self.labels,
                destination_port=self.port,
                source_principal=self.principal,
                source_ip=self.ip,
            )
        if memo is None:
            return evaluate(
                ps, base.with_http(method.decode("latin-1"), path, norm_host, header_multimap(headers), auth)
            )
        # no rule reads headers: an empty map decides the same (and costs nothing)
        d = evaluate(ps, base.with_http(method.decode("latin-1"), path, norm_host, _NO_HEADERS, None))
        if len(memo) >= DECISION_MEMO_SIZE:
            memo.clear()
        memo[(method, path, host)] = d
        return d
