"""What every role of one proxy worker is given: ``ProxyInputs``.

The roles (``outbound``, ``inbound``, ``destination``, ``upstream``,
``stats``) share one frozen set of long-lived inputs instead of reaching
into one big server object, as ztunnel's inbound and outbound share one
``ProxyInputs``.  The objects it holds live as long as the worker; some
change *inside* (the watchers' ``current``, the certificate store, the
metrics), but which objects they are never changes.  The current
``ProxyState`` snapshot is ``watcher.current``: read it once per
connection and pass it along.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.proxy import telemetry as m
from agent.proxy.authz import PolicyWatcher
from agent.proxy.log import AccessLog
from agent.proxy.state import StateWatcher
from agent.proxy.tls import TlsContexts
from agent.proxy.watch import TrafficWatcher
from agent.proxy.workload_certs import CertManager

__all__ = ["ProxyInputs"]


@dataclass(frozen=True, slots=True, eq=False)
class ProxyInputs:
    """The long-lived inputs of one proxy worker."""

    watcher: StateWatcher
    """The proxy state file; ``watcher.current`` is the snapshot in force."""
    worker_id: int
    """This worker's number (the access log's ``worker``, the stats socket's name)."""
    header_timeout: float
    """Seconds a tunnel peer may take for its TLS handshake and header (and a
    source proxy waits for the response on top of the connect timeout)."""
    certs: CertManager
    """Workload certificates, in memory only."""
    tls: TlsContexts
    """The TLS contexts built on ``certs`` (tunnel server and client sides)."""
    policies: PolicyWatcher
    """Authorization policies (policies.json next to the state file)."""
    traffic: TrafficWatcher
    """TrafficPolicies for services (traffic.json next to the state file)."""
    metrics: m.TcpMetrics
    """istio_tcp_* series."""
    http_metrics: m.HttpMetrics
    """istio_request* series (L7 requests)."""
    access: AccessLog
    """The access log (reopened in place when the state's settings change)."""
