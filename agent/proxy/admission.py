"""Admission on the destination side: accept a connection, or refuse it with
a reason — decided before any I/O, from plain data.

Pure: no sockets, no event loop, no TLS objects.  The inbound shell
(``inbound``) decodes the tunnel header and finishes the TLS handshake,
then asks these functions; the outbound shell asks ``authorize_connection``
for a Local route (this node is the destination side too).  A refusal
carries what every consumer of it needs, with the same strings the metrics
(``deny_reason``), the tunnel response (``status``) and the access log
(``reason``) have always used:

``admit_tunnel``
    0. with mTLS, key scope: the client certificate must have been issued
       by the intermediate CA of the node the connection comes from (its
       address is that node's in the state), its identity must have a mesh
       pod on that node, and the header's source address (what ipBlocks
       match) must be an address of such a pod (``key_scope``, 403).  So a
       node whose key is stolen can speak only for its own pods, never for
       the cluster;
    1. with mTLS, the header's identity must be the one the client
       certificate proved (``identity_mismatch``, 403);
    2. the destination must be a mesh pod on THIS node (``not_local``,
       never an open relay);
    3. with mTLS, SNI must have named that pod's identity, so a peer cannot
       use a certificate chosen for one pod to reach another
       (``identity_mismatch``, 403).

``authorize_connection``
    the authorization policies, per connection (``policy``, 403).  A
    connection the L7 session will serve is let through whatever its TCP
    decision: each of its requests is decided on its own (``l7authz``).
    ``ConnectionDecisions`` remembers its answers per policy set, so the
    connections of one pair of pods are decided once (issue #13).

The happy path allocates nothing new: ``admit_tunnel`` returns the
destination ``Pod``, ``authorize_connection`` the policy ``Decision``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.policy.evaluate import Decision
from agent.policy.model import PolicySet
from agent.proxy.authz import authorize
from agent.proxy.state import Pod, ProxyState, normalize_ip
from agent.proxy.tunnel import Status, TunnelRequest

__all__ = [
    "ConnectionDecisions",
    "Refusal",
    "admit_tunnel",
    "check_key_scope",
    "node_at",
    "authorize_connection",
    "decided_by",
]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection is refused."""

    code: str  # the metrics' deny reason (``metrics.DENY_REASONS``)
    status: Status  # the tunnel response's status
    reason: str  # the access log's (and the response's) reason
    decision: Decision | None = None  # the policy decision, when policy refused it
    pod: Pod | None = None  # the local destination pod, when it was found but may not be asked for


def admit_tunnel(
    state: ProxyState,
    req: TunnelRequest,
    dst_ip: str,
    *,
    verified: str | None,
    mtls: bool,
    sni_named: bool = False,
    local_identity: str | None = None,
    peer_node: str | None = None,
    issuer_node: str | None = None,
) -> Pod | Refusal:
    """Where a decoded tunnel request may go: the destination pod, or a refusal.

    ``dst_ip``: the header's destination address, normalized.  ``mtls``:
    the tunnel is mutual TLS, ``verified`` the SPIFFE ID its client
    certificate proved, ``sni_named``/``local_identity`` whether the client
    sent SNI and the identity this node presented for it; ``peer_node``
    the node whose address the connection came from (``node_at``) and
    ``issuer_node`` the node whose intermediate issued the certificate
    (``TlsConnection.peer_node``).  Plaintext tunnels (benchmarks only)
    take the header's identity on trust."""
    if mtls:
        src_ip = req.src.ip if req.src is not None else None
        scope = check_key_scope(state, verified, peer_node=peer_node, issuer_node=issuer_node, src_ip=src_ip)
        if scope is not None:
            return scope
    if mtls and req.identity != verified:
        return Refusal(
            "identity_mismatch",
            Status.FORBIDDEN,
            f"the tunnel header claims identity {req.identity!r}, but the client certificate is {verified}",
        )
    pod = state.pod_by_ip.get(dst_ip)
    if pod is None or not pod.mesh or pod.node != state.node:
        if pod is None or not pod.mesh:
            why = f"{dst_ip} is not a mesh pod on node {state.node}"
        else:
            why = (
                f"{dst_ip} is pod {pod.key} on node {pod.node}, not on node {state.node} "
                "(the sending node's state may be stale)"
            )
        return Refusal("not_local", Status.NOT_LOCAL, why)
    if mtls:
        dst_identity = state.identity(pod)
        if not sni_named or local_identity != dst_identity:
            return Refusal(
                "identity_mismatch",
                Status.FORBIDDEN,
                f"the client authenticated this node as {local_identity or 'nobody (no SNI)'}, "
                f"but asks for pod {pod.key}, which is {dst_identity}",
                pod=pod,
            )
    return pod


def check_key_scope(
    state: ProxyState,
    verified: str | None,
    *,
    peer_node: str | None,
    issuer_node: str | None,
    src_ip: str | None,
) -> Refusal | None:
    """Rule 0 of ``admit_tunnel``: None when the peer node may speak for
    ``verified`` from the source address ``src_ip`` (the tunnel header's),
    else the ``key_scope`` refusal saying why."""
    if verified is None:
        why = "the client certificate proved no identity"
    elif peer_node is None:
        why = "the connection comes from no node address of the state"
    elif issuer_node != peer_node:
        by = f"node {issuer_node}'s intermediate CA" if issuer_node else "a CA that is no node's intermediate"
        why = (
            f"the client certificate ({verified}) was issued by {by}, but the connection comes from "
            f"node {peer_node}: a node's key may only sign for that node"
        )
    elif verified not in _identities_on(state, peer_node):
        why = (
            f"node {peer_node} has no mesh pod with identity {verified}, so it may not speak for it "
            "(a compromised node, or this node's state is stale)"
        )
    elif not _speaks_from(state, peer_node, verified, src_ip):
        why = (
            f"the tunnel header's source address {src_ip or '(none)'} is no address of a mesh pod "
            f"of node {peer_node} with identity {verified}"
        )
    else:
        return None
    return Refusal("key_scope", Status.FORBIDDEN, f"key scope: {why}")


def _speaks_from(state: ProxyState, node: str, identity: str, src_ip: str | None) -> bool:
    if src_ip is None:
        return False
    try:
        pod = state.pod_by_ip.get(normalize_ip(src_ip))
    except ValueError:
        return False
    return pod is not None and pod.mesh and pod.node == node and state.identity(pod) == identity


def node_at(state: ProxyState, ip: str) -> str | None:
    """The node whose address ``ip`` (normalized) is, or None (also when two nodes claim it)."""
    found = [n.name for n in state.nodes.values() if ip in (n.address, n.address6)]
    return found[0] if len(found) == 1 else None


# (state, {node: identities of its mesh pods}) for the last state asked about:
# the state is immutable and replaced whole, so one entry is enough.
_by_node: tuple[ProxyState | None, dict[str, frozenset[str]]] = (None, {})


def _identities_on(state: ProxyState, node: str) -> frozenset[str]:
    global _by_node
    cached_state, index = _by_node
    if cached_state is not state:
        acc: dict[str, set[str]] = {}
        for pod in state.pods:
            if pod.mesh:
                acc.setdefault(pod.node, set()).add(state.identity(pod))
        index = {n: frozenset(ids) for n, ids in acc.items()}
        _by_node = (state, index)
    return index.get(node, frozenset())


def authorize_connection(
    policies: PolicySet, identity: str | None, src_ip: str | None, pod: Pod, port: int, *, http: bool = False
) -> Decision | Refusal:
    """The policy decision on a new connection to ``pod`` on ``port``, or a refusal.

    ``identity`` must be trustworthy (a verified mTLS peer, or the kernel's
    record on this node); None is a peer without one.  ``http``: the L7
    session serves the connection and decides every request, so a TCP deny
    (``DENY /admin`` denies TCP traffic whole, but only /admin requests) is
    returned as the (not allowed) decision rather than a refusal."""
    d = authorize(policies, src_identity=identity, src_ip=src_ip, dst=pod, port=port)
    if d.allowed or http:
        return d
    return Refusal("policy", Status.FORBIDDEN, f"policy: {d.reason}", d)


def decided_by(d: Any) -> str:
    """What decided a policy decision, for a log line."""
    if d.policy is None:
        return "no ALLOW policy match"
    return f"policy {d.policy} rule {d.rule}"


DECISION_MEMO_SIZE = 4096  # connection decisions kept per policy set (ConnectionDecisions)


class ConnectionDecisions:
    """``authorize_connection`` with a memo: the decision is a pure function
    of the policy set, the source identity and address, the destination pod
    (its namespace and labels) and the port, so it is made once per such
    tuple instead of per connection.

    The memo belongs to one policy set (by identity, the set is immutable):
    a reload brings a new set, which empties it.  A pod is keyed by its
    object (a new state snapshot brings new ``Pod`` objects, so relabelled
    pods miss); an entry keeps its pod, so the ``id`` in its key stays that
    pod's.  Bounded: emptied when it holds ``DECISION_MEMO_SIZE`` entries."""

    __slots__ = ("_policies", "_memo", "hits", "misses")

    def __init__(self) -> None:
        self._policies: PolicySet | None = None
        self._memo: dict[tuple[Any, ...], tuple[Pod, Decision | Refusal]] = {}
        self.hits = 0
        self.misses = 0

    def decide(
        self,
        policies: PolicySet,
        identity: str | None,
        src_ip: str | None,
        pod: Pod,
        port: int,
        *,
        http: bool = False,
    ) -> Decision | Refusal:
        """What ``authorize_connection`` answers for these arguments."""
        memo = self._memo
        if policies is not self._policies:
            memo.clear()
            self._policies = policies
        key = (identity, src_ip, id(pod), port, http)
        hit = memo.get(key)
        if hit is not None and hit[0] is pod:
            self.hits += 1
            return hit[1]
        self.misses += 1
        got = authorize_connection(policies, identity, src_ip, pod, port, http=http)
        if len(memo) >= DECISION_MEMO_SIZE:
            memo.clear()
        memo[key] = (pod, got)
        return got
