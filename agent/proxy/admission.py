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

The happy path allocates nothing new: ``admit_tunnel`` returns the
destination ``Pod``, ``authorize_connection`` the policy ``Decision``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.policy.evaluate import Decision
from agent.policy.model import PolicySet
from agent.proxy.authz import authorize
from agent.proxy.state import Pod, ProxyState
from agent.proxy.tunnel import Status, TunnelRequest

__all__ = ["Refusal", "admit_tunnel", "authorize_connection", "decided_by"]


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
) -> Pod | Refusal:
    """Where a decoded tunnel request may go: the destination pod, or a refusal.

    ``dst_ip``: the header's destination address, normalized.  ``mtls``:
    the tunnel is mutual TLS, ``verified`` the SPIFFE ID its client
    certificate proved, ``sni_named``/``local_identity`` whether the client
    sent SNI and the identity this node presented for it.  Plaintext
    tunnels (benchmarks only) take the header's identity on trust."""
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
