"""The agent configuration: the file given to ``meshlet run --config FILE``.

Pure: :func:`parse_config` turns text into an :class:`AgentConfig` or raises
:class:`~agent.yamlsrc.SourceError` listing every problem with
``file:line:column: field.path: message``.  :func:`load_config` only adds
reading the file.  Settings are grouped frozen dataclasses, one docstring per
field; YAML keys are camelCase, attributes snake_case, and
:meth:`AgentConfig.to_dict` gives back the YAML shape with every default
filled in (``parse_config(yaml.safe_dump(c.to_dict()))`` == ``c``).

Example::

    node: node1
    inventory: inventory.yaml          # relative to this file's directory
    cgroup: /sys/fs/cgroup/unified/meshlet/node1
    proxy:
      redirectIPv4: 10.244.1.1
    mesh:
      mode: strict
      excludePorts: [22]
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from agent import yamlsrc as y

__all__ = [
    "MESH_MODES",
    "MeshMode",
    "LOG_LEVELS",
    "TC_ATTACH_MODES",
    "BpfConfig",
    "ProxyConfig",
    "MeshConfig",
    "AdminConfig",
    "MetricsConfig",
    "AccessLogConfig",
    "TracingConfig",
    "WorkloadsConfig",
    "WORKLOAD_SOURCES",
    "AgentConfig",
    "load_config",
    "parse_config",
]

MeshMode = Literal["permissive", "strict"]
#: Allowed values of ``mesh.mode`` (and of per-namespace ``mode`` in the inventory).
MESH_MODES: tuple[str, ...] = ("permissive", "strict")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
#: Values of ``workloads.source``.
WORKLOAD_SOURCES: tuple[str, ...] = ("file", "kubernetes")
#: Allowed values of ``bpf.tcAttach`` (as agent.datapath.loader.TC_ATTACH_MODES).
TC_ATTACH_MODES: tuple[str, ...] = ("auto", "tcx", "clsact")

#: Unix socket paths longer than this do not fit in ``sockaddr_un.sun_path``.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class BpfConfig:
    """Where the agent keeps its eBPF objects."""

    pin_dir: str
    """bpffs directory for pinned maps and programs (``bpf.pinDir``);
    default ``/sys/fs/bpf/meshlet/<node>``."""
    flow_tracking: bool = True
    """``bpf.flowTracking``: attach the kernel flow table (``meshlet flows``,
    RTT in ``meshlet stats``). The environment variable
    ``MESHLET_FLOW_TRACKING=0`` turns it off too (benchmarks)."""
    flow_history: int = 4096
    """``bpf.flowHistory``: closed flows the agent keeps for ``meshlet flows``
    (and ``--follow``'s catch-up), 0..1000000; 144 bytes of kernel record
    each, so the default holds about 0.7 MB.  The default is Hubble's (its
    ring of 4095 flows); raise it to look further back on a busy node."""
    kernel_policy: bool = True
    """``bpf.kernelPolicy``: refuse at ``connect()`` what authorization
    policies deny whatever the connection carries; off, the proxies decide
    everything. ``MESHLET_KERNEL_POLICY=0`` turns it off too (tests)."""
    tc_attach: str = "auto"
    """``bpf.tcAttach``: how strict mode's program goes on each pod's veth:
    ``tcx`` links (kernel >= 6.6), a ``clsact`` qdisc with a cls_bpf filter
    (any kernel meshlet runs on), or ``auto``: tcx when the kernel has it.
    ``MESHLET_TC_ATTACH`` overrides ``auto`` (tests)."""


@dataclass(frozen=True)
class ProxyConfig:
    """The node proxy that enrolled pods' connections are redirected to."""

    redirect_ipv4: ipaddress.IPv4Address
    """Address ``connect4`` rewrites destinations to (``proxy.redirectIPv4``);
    node-local and reachable from pods. Required."""

    redirect_ipv6: ipaddress.IPv6Address | None = None
    """Address ``connect6`` rewrites to (``proxy.redirectIPv6``); None means
    IPv6 connections are not redirected."""

    outbound_port: int = 15001
    """Listener for redirected outbound connections (``proxy.outboundPort``)."""

    inbound_port: int = 15006
    """Listener for plaintext inbound connections (``proxy.inboundPort``)."""

    tunnel_port: int = 15008
    """Listener for the mTLS tunnel between nodes (``proxy.tunnelPort``)."""

    workers: int = 2
    """Proxy worker processes sharing the listeners, 1..64 (``proxy.workers``).
    Default: ``default_workers()``, the usable cores, at least 2 and at most 4:
    with siblings, a worker crash or upgrade never leaves the node without a
    listener."""

    connect_timeout: float = 5.0
    """Seconds to wait for an upstream connect, >0 and ≤120 (``proxy.connectTimeout``)."""

    mesh_mark: int = 0x4D4C0000
    """Nonzero 32-bit SO_MARK on the proxy's upstream sockets, so the datapath
    does not redirect them again (``proxy.meshMark``; int or "0x..." string)."""

    buffer_size: int = 262144
    """Per-direction relay buffer high-water mark in bytes, 4 KiB..64 MiB
    (``proxy.bufferSize``)."""

    tunnel_security: str = "mtls"
    """``proxy.tunnelSecurity``: ``mtls`` (default; the only production
    setting) or ``insecure-plaintext``, which turns mutual TLS between nodes
    off so a benchmark can measure what TLS costs. Both ends must agree; the
    agent logs a warning at every start."""

    tls_resumption: bool = True
    """``proxy.tlsResumption``: resume TLS sessions for new tunnel connections
    (cheaper handshakes). Off only to measure full-handshake cost."""

    splice: bool | str = "auto"
    """``proxy.splice``: once a plaintext connection between two pods of this
    node is authorized and needs no L7, let the pods' own sockets send past
    the proxy (sk_msg egress redirect into the proxy's socket facing the
    other pod, bpf/splice.c) instead of relaying every byte. ``auto`` (the
    default): wherever the kernel has sk_msg and sock_ops programs and
    SOCKHASH maps (Linux >= 4.20, CONFIG_BPF_STREAM_PARSER); on a kernel
    without them the agent logs one warning, ``meshlet doctor`` says so, and
    same-node connections stay on the userspace relay. ``true``: required, a
    kernel without them is an error naming the fix. ``false``: off."""
    tunnel_mux: bool = True
    """``proxy.tunnelMux``: carry many pod connections to another node over
    one pooled mutual-TLS connection per (source identity, destination
    identity, node), ALPN ``meshlet-mux/1``; peers that do not offer it
    (an older release, or this knob off there) get one TLS connection per
    pod connection (``meshlet-tunnel/1``). Off: this node only speaks
    ``meshlet-tunnel/1``, both ways."""

    path_parameters: str = "reject"
    """``proxy.pathParameters``: what the L7 session does with path
    parameters (``/admin;x=y``), which servlet-style backends strip before
    routing (so a ``DENY /admin`` must see them): ``reject`` (default)
    answers 400 to a ``;`` or ``%3B`` in the path; ``strip`` removes each
    segment's parameters, so policy matches and the backend receives the
    path without them; ``keep`` forwards them untouched (only for backends
    that never strip them: an exact rule ``/admin`` does not match
    ``/admin;x``)."""

    l7: bool | str = "auto"
    """``proxy.l7``: where the proxy parses HTTP/1.x (the L7 session:
    per-request authorization, request metrics and log lines, trace headers,
    keep-alive pools).  ``true``: every connection on the destination node
    whose first bytes are HTTP/1.x.  ``auto`` (default): only connections to
    pods that an authorization policy with HTTP fields selects (so such
    policies work per request), everything else stays on the faster L4
    relay.  ``false``: never; HTTP fields in policies then follow Istio's
    TCP rules (a DENY denies the whole connection, an ALLOW never matches).
    Service ports with ``appProtocol: http`` (or undeclared and sniffed,
    unless ``false``) are balanced per request by the client's node proxy
    in every mode."""


def _l7_mode(v: y.Value) -> bool | str:
    """``proxy.l7`` and ``proxy.splice``: true, false or auto."""
    x = v.scalar()
    if isinstance(x, bool) or x == "auto":
        return x
    raise y.Invalid(f"expected true, false or auto, got {y.describe_node(v.node)} {v.node.value!r}")


@dataclass(frozen=True)
class MeshConfig:
    """Which traffic the mesh takes over."""

    mode: MeshMode = "permissive"
    """``permissive`` accepts plaintext from outside the mesh to enrolled pods,
    ``strict`` refuses it (``mesh.mode``). The inventory can override it per
    namespace."""

    exclude_ports: tuple[int, ...] = ()
    """Destination ports never redirected, sorted and unique (``mesh.excludePorts``)."""

    exclude_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """IPv4/IPv6 destination networks never redirected (``mesh.excludeCIDRs``)."""


@dataclass(frozen=True)
class IdentityConfig:
    """Workload identities (SPIFFE X.509-SVIDs) and the node's CA material."""

    bundle: str
    """PEM file of the trust bundle: every root this node trusts
    (``identity.bundle``; relative to the config file). Watched: during a
    CA rotation it holds the old and the new root."""

    ca_cert: str
    """This node's intermediate CA certificate, PEM (``identity.caCert``)."""

    ca_key: str
    """Its private key, PEM (``identity.caKey``). The node signs SVIDs only
    for service accounts of pods running on it."""

    trust_domain: str = "cluster.local"
    """SPIFFE trust domain (``identity.trustDomain``)."""

    cert_ttl: int = 86400
    """Workload certificate lifetime in seconds (``identity.certTTL``); the
    proxy renews at about half of it."""

    node_ca: str = "files"
    """``identity.nodeCA``: ``files`` (caCert/caKey/bundle are placed on the
    node, e.g. from ``meshlet ca init``) or ``csr`` (Kubernetes mode, the
    default there: the agent asks ``meshlet ca controller`` for its
    intermediate by CertificateSigningRequest and writes those three files
    itself; README, "Identity: threat model")."""


@dataclass(frozen=True)
class AdminConfig:
    """The admin API the CLI talks to."""

    socket: str
    """Unix socket path (``admin.socket``); default ``<runDir>/admin.sock``."""


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (``/metrics``) the agent serves on the node."""

    enabled: bool = True
    """Serve metrics at all (``metrics.enabled``)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address("0.0.0.0")
    """Listen address (``metrics.address``), in the node's network namespace."""

    port: int = 15020
    """Listen port (``metrics.port``); 15020 is Istio's merged-metrics port."""


@dataclass(frozen=True)
class AccessLogConfig:
    """The proxy's access log: one JSON line per connection."""

    enabled: bool = True
    """Write the access log at all (``accessLog.enabled``); off means no file writes."""

    sampling: float = 1.0
    """Fraction of connections logged, 0..1 (``accessLog.sampling``). The
    choice is per connection and deterministic in its original 4-tuple, so
    both node proxies of a cross-node connection log it or neither does."""

    path: str | None = None
    """Absolute file path (``accessLog.path``); default ``<runDir>/access.log``."""


@dataclass(frozen=True)
class TracingConfig:
    """Trace spans of the L7 proxy, exported to an OpenTelemetry collector
    (OTLP over HTTP, protobuf): one span per request and proxy hop. Without
    ``otlpEndpoint`` there is no tracing at all (no span, no SDK loaded);
    the proxy still propagates ``traceparent`` either way."""

    otlp_endpoint: str | None = None
    """``tracing.otlpEndpoint``: the collector's OTLP/HTTP traces URL, e.g.
    ``http://otel-collector.observability:4318/v1/traces`` (a URL with no
    path gets ``/v1/traces``); http or https, no credentials in it."""

    sample_rate: float = 0.01
    """``tracing.sampleRate``: 0..1, the fraction of requests that arrive
    without a ``traceparent`` whose trace is sampled (then forwarded with
    the sampled flag). A request's own sampled flag always decides."""

    max_queue: int = 2048
    """``tracing.maxQueue``: spans a worker holds for export, 1..1000000;
    beyond that new spans are dropped and counted (a slow or absent
    collector never slows traffic)."""

    max_batch: int = 512
    """``tracing.maxBatch``: spans per export request, 1..100000."""

    export_timeout: float = 5.0
    """``tracing.exportTimeout``: seconds one export request may take, retries
    included (0..60, exclusive of 0); then it counts as failed."""

    export_interval: float = 1.0
    """``tracing.exportInterval``: seconds between exports when fewer than
    ``maxBatch`` spans are waiting, 0.05..60."""


@dataclass(frozen=True)
class WorkloadsConfig:
    """Where pods, nodes, namespaces and services come from (``workloads``)."""

    source: str = "file"
    """``workloads.source``: ``file`` (the YAML ``inventory:``) or
    ``kubernetes`` (the API server: list+watch, see README "Kubernetes")."""

    kubeconfig: str | None = None
    """``workloads.kubeconfig``: a kubeconfig file (relative to the config
    file), for running outside a pod; absent, the in-cluster service account
    (token, CA and ``KUBERNETES_SERVICE_HOST``) is used."""

    context: str | None = None
    """``workloads.context``: the kubeconfig context; default its current-context."""

    kubelet_cgroup_root: str | None = None
    """``workloads.kubeletCgroupRoot``: the kubelet's ``--cgroup-root``, absolute
    or relative to the cgroup2 mount; default the mount itself. The cgroup
    driver (systemd or cgroupfs) is detected under it."""

    sync_timeout: float = 60.0
    """``workloads.syncTimeout``: seconds the agent waits at start for the
    first complete list of every resource, 1..3600."""

    watch_timeout: float = 300.0
    """``workloads.watchTimeout``: seconds a watch request lasts before it is
    renewed (the server's ``timeoutSeconds``, jittered up to +25%), 1..3600;
    a watch silent for that long plus 30 s counts as hung and is reopened."""

    max_policy_bytes: int = 4 << 20
    """``workloads.maxPolicyBytes``: the largest policy set from the cluster
    (bytes of policy text, every object of every kind), 4 MiB..64 MiB; a
    larger set is refused whole and the previous one stays in force
    (agent.policy.store.StoreFull)."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``meshlet run`` needs to know, validated."""

    node: str
    """This node's name, an RFC 1123 label; must appear in the inventory (``node``)."""

    inventory: str | None
    """Path of the node inventory file, resolved against the config file's
    directory when relative (``inventory``); required unless
    ``workloads.source`` is ``kubernetes``."""

    cgroup: str
    """cgroup v2 subtree holding this node's pods, absolute or relative to the
    cgroup2 mount; kept as written (``cgroup``)."""

    bpf: BpfConfig
    """eBPF object settings (``bpf``)."""

    proxy: ProxyConfig
    """Node proxy settings (``proxy``)."""

    mesh: MeshConfig
    """Redirect scope and mode (``mesh``)."""

    admin: AdminConfig
    """Admin API settings (``admin``)."""

    identity: IdentityConfig
    """Identity and mTLS settings (``identity``); required: meshlet never
    tunnels between nodes without mutual TLS."""

    run_dir: str
    """Directory for runtime state (``runDir``); default ``/run/meshlet/<node>``."""

    handover_dir: str = ""
    """Directory every agent of this node shares, holding the hand-over lease
    that says which one writes the shared datapath state (``handoverDir``,
    see agent/handover.py); default ``runDir``.  Set it when two agents of a
    node have different run dirs (Kubernetes: a hostPath)."""

    log_level: str = "info"
    """One of debug, info, warning, error (``logLevel``)."""

    metrics: MetricsConfig = MetricsConfig()
    """Prometheus endpoint (``metrics``)."""

    access_log: AccessLogConfig = AccessLogConfig()
    """Access log settings (``accessLog``)."""

    tracing: TracingConfig = TracingConfig()
    """Span export to an OpenTelemetry collector (``tracing``)."""

    workloads: WorkloadsConfig = WorkloadsConfig()
    """Workload source (``workloads``)."""

    @property
    def access_log_path(self) -> str:
        return self.access_log.path or os.path.join(self.run_dir, "access.log")

    def to_dict(self) -> dict[str, Any]:
        """The YAML shape (camelCase keys, plain types), every default filled in."""
        p, m = self.proxy, self.mesh
        proxy: dict[str, Any] = {"redirectIPv4": str(p.redirect_ipv4)}
        if p.redirect_ipv6 is not None:
            proxy["redirectIPv6"] = str(p.redirect_ipv6)
        proxy.update(
            {
                "outboundPort": p.outbound_port,
                "inboundPort": p.inbound_port,
                "tunnelPort": p.tunnel_port,
                "workers": p.workers,
                "connectTimeout": p.connect_timeout,
                "meshMark": p.mesh_mark,
                "bufferSize": p.buffer_size,
                "tunnelSecurity": p.tunnel_security,
                "tlsResumption": p.tls_resumption,
                "splice": p.splice,
                "tunnelMux": p.tunnel_mux,
                "pathParameters": p.path_parameters,
                "l7": p.l7,
            }
        )
        return {
            "node": self.node,
            "inventory": self.inventory,
            "cgroup": self.cgroup,
            "bpf": {
                "pinDir": self.bpf.pin_dir,
                "flowTracking": self.bpf.flow_tracking,
                "flowHistory": self.bpf.flow_history,
                "kernelPolicy": self.bpf.kernel_policy,
                "tcAttach": self.bpf.tc_attach,
            },
            "proxy": proxy,
            "mesh": {
                "mode": m.mode,
                "excludePorts": list(m.exclude_ports),
                "excludeCIDRs": [str(c) for c in m.exclude_cidrs],
            },
            "admin": {"socket": self.admin.socket},
            "identity": {
                "trustDomain": self.identity.trust_domain,
                "bundle": self.identity.bundle,
                "caCert": self.identity.ca_cert,
                "caKey": self.identity.ca_key,
                "certTTL": self.identity.cert_ttl,
                "nodeCA": self.identity.node_ca,
            },
            "runDir": self.run_dir,
            "handoverDir": self.handover_dir or self.run_dir,
            "logLevel": self.log_level,
            "metrics": {
                "enabled": self.metrics.enabled,
                "address": str(self.metrics.address),
                "port": self.metrics.port,
            },
            "accessLog": {
                "enabled": self.access_log.enabled,
                "sampling": self.access_log.sampling,
                "path": self.access_log_path,
            },
            "tracing": {
                **({"otlpEndpoint": self.tracing.otlp_endpoint} if self.tracing.otlp_endpoint else {}),
                "sampleRate": self.tracing.sample_rate,
                "maxQueue": self.tracing.max_queue,
                "maxBatch": self.tracing.max_batch,
                "exportTimeout": self.tracing.export_timeout,
                "exportInterval": self.tracing.export_interval,
            },
            "workloads": {
                k: v
                for k, v in {
                    "source": self.workloads.source,
                    "kubeconfig": self.workloads.kubeconfig,
                    "context": self.workloads.context,
                    "kubeletCgroupRoot": self.workloads.kubelet_cgroup_root,
                    "syncTimeout": self.workloads.sync_timeout,
                    "watchTimeout": self.workloads.watch_timeout,
                    "maxPolicyBytes": self.workloads.max_policy_bytes,
                }.items()
                if v is not None
            },
        }


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate the config file at ``path``; raises ``SourceError``."""
    path = os.fspath(path)
    return parse_config(y.read_text(path), path)


def parse_config(text: str, filename: str = "<config>", base_dir: str | None = None) -> AgentConfig:
    """Validate config text; relative ``inventory`` resolves against ``base_dir``
    (default: the directory of ``filename``)."""
    doc = y.parse(text, filename)
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(filename))
    cfg = _read(doc.top(), base_dir)
    doc.check()
    assert cfg is not None
    return cfg


def _socket_path(v: y.Value) -> str:
    s = y.absolute_path(v)
    if len(s.encode()) > MAX_SOCKET_PATH:
        raise y.Invalid(
            f"path is {len(s.encode())} bytes; Unix socket paths are limited to "
            f"{MAX_SOCKET_PATH}, choose a shorter one"
        )
    return s


def _read(top: y.MapReader, base_dir: str) -> AgentConfig | None:
    doc = top.doc
    node = top.get("node", y.dns_label)
    kube = _peek_source(top) == "kubernetes"
    inventory = top.get("inventory", y.string, None) if kube else top.get("inventory", y.string)
    cgroup = top.get("cgroup", y.string)
    run_dir = top.get("runDir", y.absolute_path, None)
    handover_dir = top.get("handoverDir", y.absolute_path, None)
    log_level = top.get("logLevel", y.enum(*LOG_LEVELS), "info")
    bpf_r, proxy_r = top.section("bpf"), top.section("proxy")
    mesh_r, admin_r = top.section("mesh"), top.section("admin")
    ident_r = top.section("identity")
    metrics_r, access_r = top.section("metrics"), top.section("accessLog")
    work_r, tracing_r = top.section("workloads"), top.section("tracing")
    top.finish()

    name = node or "<node>"  # only used for defaults; a bad node is already reported
    run_dir = run_dir or f"/run/meshlet/{name}"
    if inventory is not None:
        inventory = os.path.normpath(os.path.join(base_dir, inventory))

    bpf = proxy = mesh = admin = None
    if bpf_r is not None:
        bpf = BpfConfig(
            pin_dir=bpf_r.get("pinDir", y.absolute_path, f"/sys/fs/bpf/meshlet/{name}"),
            flow_tracking=bpf_r.get("flowTracking", y.boolean, True),
            flow_history=bpf_r.get("flowHistory", y.integer(0, 1_000_000), 4096),
            kernel_policy=bpf_r.get("kernelPolicy", y.boolean, True),
            tc_attach=bpf_r.get("tcAttach", y.enum(*TC_ATTACH_MODES), "auto"),
        )
        bpf_r.finish()
    if proxy_r is not None:
        proxy = _read_proxy(proxy_r)
    if mesh_r is not None:
        ports = mesh_r.get("excludePorts", y.list_of(y.port), ())
        cidrs = mesh_r.get("excludeCIDRs", y.list_of(y.ip_network), ())
        mesh = MeshConfig(
            mode=mesh_r.get("mode", y.enum(*MESH_MODES), "permissive"),
            exclude_ports=tuple(sorted(set(ports or ()))),
            exclude_cidrs=tuple(dict.fromkeys(cidrs or ())),
        )
        mesh_r.finish()
    if admin_r is not None:
        admin = AdminConfig(socket=admin_r.get("socket", _socket_path, f"{run_dir}/admin.sock"))
        if not admin_r.has("socket") and len(admin.socket.encode()) > MAX_SOCKET_PATH:
            v = top.at("runDir")
            doc.add_at(
                v.node if v else None,
                "runDir",
                f"the default admin socket {admin.socket!r} is longer than {MAX_SOCKET_PATH} "
                "bytes; shorten runDir or set admin.socket",
            )
        admin_r.finish()

    identity = None
    if ident_r is not None:

        def rel(v: y.Value) -> str:
            return os.path.normpath(os.path.join(base_dir, y.string(v)))

        identity = IdentityConfig(
            bundle=ident_r.get("bundle", rel),
            ca_cert=ident_r.get("caCert", rel),
            ca_key=ident_r.get("caKey", rel),
            trust_domain=ident_r.get("trustDomain", _trust_domain, "cluster.local"),
            cert_ttl=ident_r.get("certTTL", y.integer(10, 90 * 86400), 86400),
            node_ca=ident_r.get("nodeCA", y.enum("files", "csr"), "csr" if kube else "files"),
        )
        if identity.node_ca == "csr" and not kube:
            v = ident_r.at("nodeCA")
            doc.add_at(
                v.node if v else None,
                "identity.nodeCA",
                "csr needs the Kubernetes API (workloads.source: kubernetes); "
                "with the file source, place the files from 'meshlet ca init' and use files",
            )
        ident_r.finish()

    metrics = access_log = None
    if metrics_r is not None:
        metrics = MetricsConfig(
            enabled=metrics_r.get("enabled", y.boolean, True),
            address=metrics_r.get("address", _listen_address, ipaddress.IPv4Address("0.0.0.0")),
            port=metrics_r.get("port", y.port, 15020),
        )
        metrics_r.finish()
        if (
            proxy is not None
            and metrics.enabled
            and metrics.port in (proxy.outbound_port, proxy.inbound_port, proxy.tunnel_port)
        ):
            v = metrics_r.at("port") or metrics_r.value
            doc.add_at(
                v.node,
                "metrics.port",
                f"port {metrics.port} is also a proxy listener port; choose another (default 15020)",
            )
    if access_r is not None:
        access_log = AccessLogConfig(
            enabled=access_r.get("enabled", y.boolean, True),
            sampling=access_r.get("sampling", y.number(0, 1), 1.0),
            path=access_r.get("path", y.absolute_path, os.path.join(run_dir, "access.log")),
        )
        access_r.finish()

    tracing = None
    if tracing_r is not None:
        tracing = _read_tracing(tracing_r)

    workloads = None
    if work_r is not None:

        def rel_file(v: y.Value) -> str:
            return os.path.normpath(os.path.join(base_dir, y.string(v)))

        workloads = WorkloadsConfig(
            source=work_r.get("source", y.enum(*WORKLOAD_SOURCES), "file"),
            kubeconfig=work_r.get("kubeconfig", rel_file, None),
            context=work_r.get("context", y.string, None),
            kubelet_cgroup_root=work_r.get("kubeletCgroupRoot", y.string, None),
            sync_timeout=work_r.get("syncTimeout", y.number(1, 3600), 60.0),
            watch_timeout=work_r.get("watchTimeout", y.number(1, 3600), 300.0),
            max_policy_bytes=work_r.get("maxPolicyBytes", y.integer(4 << 20, 64 << 20), 4 << 20),
        )
        work_r.finish()

    if doc.failed:
        return None
    # A section reader gives None only after reporting a problem (doc.failed).
    assert bpf is not None and proxy is not None and mesh is not None and admin is not None
    assert identity is not None and metrics is not None and access_log is not None
    assert workloads is not None and tracing is not None
    return AgentConfig(
        node=node,
        inventory=inventory,
        cgroup=cgroup,
        bpf=bpf,
        proxy=proxy,
        mesh=mesh,
        admin=admin,
        identity=identity,
        run_dir=run_dir,
        handover_dir=handover_dir or run_dir,
        log_level=log_level,
        metrics=metrics,
        access_log=access_log,
        tracing=tracing,
        workloads=workloads,
    )


def _peek_source(top: y.MapReader) -> str | None:
    """``workloads.source`` as written (only to know whether ``inventory`` is
    required; the section itself is read, and reported, later)."""
    from yaml.nodes import MappingNode, ScalarNode

    e = top.entries.get("workloads")
    if e is None or not isinstance(e[1].node, MappingNode):
        return None
    for k, v in e[1].node.value:
        if isinstance(k, ScalarNode) and k.value == "source" and isinstance(v, ScalarNode):
            return v.value
    return None


def _otlp_endpoint(v: y.Value) -> str:
    """An OTLP/HTTP traces URL: http(s)://host[:port][/path]; no path means
    the standard ``/v1/traces``."""
    import urllib.parse  # only with tracing configured: the agent keeps what it imports

    s = y.string(v)
    try:
        u = urllib.parse.urlsplit(s)
        port = u.port
    except ValueError as e:
        raise y.Invalid(f"{s!r} is not a URL: {e}") from None
    if u.scheme not in ("http", "https"):
        raise y.Invalid(
            f"{s!r}: the scheme must be http or https (OTLP over HTTP, e.g. http://collector:4318/v1/traces)"
        )
    if not u.hostname:
        raise y.Invalid(f"{s!r} names no host (e.g. http://collector:4318/v1/traces)")
    if u.username is not None or u.password is not None:
        raise y.Invalid(f"{u.scheme}://...@{u.hostname}: credentials do not belong in the config file's URL")
    if u.query or u.fragment:
        raise y.Invalid(f"{s!r}: an OTLP endpoint has no query or fragment")
    if port == 0:
        raise y.Invalid(f"{s!r}: port 0 is not a port")
    path = u.path if u.path not in ("", "/") else "/v1/traces"
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def _read_tracing(r: y.MapReader) -> TracingConfig | None:
    d = TracingConfig.__dataclass_fields__
    t = dict(
        otlp_endpoint=r.get("otlpEndpoint", _otlp_endpoint, None),
        sample_rate=r.get("sampleRate", y.number(0, 1), d["sample_rate"].default),
        max_queue=r.get("maxQueue", y.integer(1, 1_000_000), d["max_queue"].default),
        max_batch=r.get("maxBatch", y.integer(1, 100_000), d["max_batch"].default),
        export_timeout=r.get("exportTimeout", y.number(0, 60, lo_open=True), d["export_timeout"].default),
        export_interval=r.get("exportInterval", y.number(0.05, 60), d["export_interval"].default),
    )
    r.finish()
    if any(v is None for k, v in t.items() if k != "otlp_endpoint"):
        return None
    return TracingConfig(**t)


def _listen_address(v: y.Value) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address to listen on: unicast, or 0.0.0.0 / :: for every address."""
    x = y.string(v)
    try:
        addr = ipaddress.ip_address(x)
    except ValueError:
        raise y.Invalid(
            f"{x!r} is not an IP address (use 0.0.0.0 for every IPv4 address, :: for every address)"
        ) from None
    if addr.is_multicast or (isinstance(addr, ipaddress.IPv6Address) and addr.scope_id):
        raise y.Invalid(f"{x!r} cannot be listened on; use a unicast address, 0.0.0.0 or ::")
    return addr


_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")


def _trust_domain(v: y.Value) -> str:
    s = y.string(v)
    if not _TRUST_DOMAIN_RE.match(s):
        raise y.Invalid(
            f"{s!r} is not a SPIFFE trust domain: lowercase letters, digits, "
            "'.', '-' and '_' only (e.g. cluster.local)"
        )
    return s


def default_workers() -> int:
    """``proxy.workers`` when not set: one per usable core, at least 2 (so a
    crashed or upgraded worker always has a sibling serving), at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(2, min(cores, 4))


def _read_proxy(r: y.MapReader) -> ProxyConfig | None:
    d = ProxyConfig.__dataclass_fields__
    p = dict(
        redirect_ipv4=r.get("redirectIPv4", y.ip_address(4)),
        redirect_ipv6=r.get("redirectIPv6", y.ip_address(6), None),
        outbound_port=r.get("outboundPort", y.port, d["outbound_port"].default),
        inbound_port=r.get("inboundPort", y.port, d["inbound_port"].default),
        tunnel_port=r.get("tunnelPort", y.port, d["tunnel_port"].default),
        workers=r.get("workers", y.integer(1, 64), default_workers()),
        connect_timeout=r.get("connectTimeout", y.number(0, 120, lo_open=True), d["connect_timeout"].default),
        mesh_mark=r.get("meshMark", y.integer(1, 0xFFFFFFFF, hex_string=True), d["mesh_mark"].default),
        buffer_size=r.get("bufferSize", y.integer(4096, 64 << 20), d["buffer_size"].default),
        tunnel_security=r.get("tunnelSecurity", y.enum("mtls", "insecure-plaintext"), "mtls"),
        tls_resumption=r.get("tlsResumption", y.boolean, True),
        splice=r.get("splice", _l7_mode, "auto"),
        tunnel_mux=r.get("tunnelMux", y.boolean, True),
        path_parameters=r.get("pathParameters", y.enum("reject", "strip", "keep"), "reject"),
        l7=r.get("l7", _l7_mode, "auto"),
    )
    r.finish()
    # The three listeners must not collide; report at the one written in the file.
    seen: dict[int, str] = {}
    for key, attr in (
        ("outboundPort", "outbound_port"),
        ("inboundPort", "inbound_port"),
        ("tunnelPort", "tunnel_port"),
    ):
        value = p[attr]
        if value is None:
            continue
        if value not in seen:
            seen[value] = key
            continue
        other = seen[value]
        blame = key if r.has(key) else other
        v = r.at(blame)
        r.doc.add_at(
            v.node if v else r.value.node,
            f"{r.path}.{blame}",
            f"port {value} is also {key if blame == other else other}; the proxy "
            "listeners need three different ports",
        )
    if any(v is None for k, v in p.items() if k != "redirect_ipv6"):
        return None
    return ProxyConfig(**p)
