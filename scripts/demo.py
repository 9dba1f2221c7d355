#!/usr/bin/env python3
"""meshlet demo: a simulated 2-node, 4-pod cluster with one agent per node.

Real traffic flows between pods, same node and cross node: HTTP (Python's
http.server + curl), a checksummed bulk transfer both ways and an iperf3 run.
The demo then prints the evidence that every connection went through the node
proxies — what the servers saw as their peer, the proxies' connection logs
and the kernel's redirect counters.  Then a service VIP in front of both web
servers (requests balanced across nodes), authorization policies applied with
the CLI (a 403 on one path with the connection kept, a connect() refused by
the kernel), and the proxies' Istio request metrics; then an API gateway
(nginx in an enrolled pod, routes from policies/gateway/routes) in front of
two mesh services, end-user JWTs checked by the mesh (not with
``--kubernetes``); then it tears everything down.

Exit status 0 only if the evidence is complete.  Run as root (``make demo``
or ``scripts/run demo`` bootstraps the machine first).

``--kubernetes``: the same run with the agents in Kubernetes mode: they read
nodes, namespaces, pods and services from the local test API server
(tests/support/kubeapi.py, served in each node's network namespace) instead
of the inventory file, and find the pods in the cgroups the kubelet would
have made (systemd driver on node1, cgroupfs on node2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, service, service_vip  # noqa: E402

TOOLS = [sys.executable, "-m", "agent.sim.tools"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def section(title: str) -> None:
    say(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if set(args) - {"--kubernetes"}:
        say("usage: demo.py [--kubernetes]")
        return 2
    kubernetes = "--kubernetes" in args
    if os.geteuid() != 0:
        say("the demo builds network namespaces and loads eBPF: run it as root")
        return 2
    problems: list[str] = []
    webroot = tempfile.mkdtemp(prefix="meshlet-demo-www-")
    with open(os.path.join(webroot, "hello.txt"), "w") as f:
        f.write("hello from a pod behind meshlet\n" * 64)
    files = {"app": "files"}  # the two web servers: endpoints of the service "files"
    cluster = Cluster(nodes=2, pods_per_node=2, pod_specs={
        1: [{"name": "pod1-1"}, {"name": "pod1-2", "labels": files}],
        2: [{"name": "pod2-1", "labels": files}, {"name": "pod2-2"}]})
    mesh = None
    api = None
    try:
        section("building the simulated cluster")
        cluster.up()
        for n in cluster.nodes:
            say(f"{n.name}: netns {n.netns}, address {n.address}, proxy at {n.gateway4} / "
                f"{n.gateway6}, cgroup {n.cgroup}")
            for p in n.pods:
                say(f"   pod {p.name:<8} {p.ip4:<13} {p.ip6:<18} cgroup .../pods/{p.name}")

        services = [service("files", files, [{"port": 80, "targetPort": 8080, "appProtocol": "http"}], index=1)]
        if kubernetes:
            from tests.support.kubeapi import FakeKubeAPI
            from tests.support.kubemesh import KubeMesh, driver_of, publish

            section("Kubernetes mode: the workloads come from an API server")
            api = FakeKubeAPI(workdir=tempfile.mkdtemp(prefix="meshlet-demo-kube-"), bookmark_interval=5.0)
            api.istio = True  # Istio's AuthorizationPolicy CRD is installed: the demo policy is one
            publish(cluster, api, services=services)
            api.start()
            say(f"test API server {api.url} (also on each node's loopback): "
                f"{len(api.objects)} objects: nodes, namespace default with "
                "meshlet.io/dataplane-mode=enabled, pods, service files + EndpointSlice")
            for p in cluster.pods:
                say(f"   pod {p.name:<8} kubelet cgroup ({driver_of(cluster.node(p.node))} driver) "
                    f"...{p.cgroup[len(cluster.node(p.node).cgroup):]}")
            mesh = KubeMesh(cluster, services=services)
            mesh.kubeconfig = api.kubeconfig(os.path.join(api.workdir, "kubeconfig"))
        else:
            mesh = Mesh(cluster, services=services)
        section("starting one meshlet agent per node")
        t0 = time.monotonic()
        mesh.start()
        say(f"agents ready in {time.monotonic() - t0:.1f}s")
        if kubernetes:
            for n in cluster.nodes:
                src = mesh.status(n.name)["inventory"]["source"]
                d = src["detail"]
                say(f"{n.name}: workloads from {src['kind']} {src['where']}, in sync {d['in_sync']}, "
                    f"kubelet cgroup driver {d['cgroup_driver']}")
                if not d["in_sync"] or d["cgroup_driver"] != driver_of(n):
                    problems.append(f"{n.name}: Kubernetes source {src}")
        for n in cluster.nodes:
            st = mesh.status(n.name)
            say(f"{n.name}: datapath {st['datapath']['how']}, enrolled "
                f"{[e['pod'] for e in st['enrolled']]}, proxy pid "
                f"{[w['pid'] for w in st['proxy']]}")
        before = {n.name: mesh.counters(n.name) for n in cluster.nodes}

        section("servers in pods")
        http_logs = {}
        for name in ("pod1-2", "pod2-1"):
            pod = cluster.pod(name)
            log_path = os.path.join(mesh.workdir, f"http-{name}.log")
            http_logs[name] = log_path
            pod.popen([sys.executable, "-m", "http.server", "8080", "--bind", "::",
                       "--directory", webroot], stdout=subprocess.DEVNULL,
                      stderr=open(log_path, "w"))
            say(f"{name}: python -m http.server 8080")
        for pod in cluster.pods:
            p = pod.popen(TOOLS + ["serve", "--port", "7000", "--max-seconds", "300"],
                          stdout=subprocess.PIPE, text=True)
            p.stdout.readline()
        iperf = cluster.pod("pod2-2").popen(["iperf3", "-s", "-1", "-p", "5201"],
                                            stdout=subprocess.DEVNULL) \
            if shutil.which("iperf3") else None
        say("every pod: transfer server on 7000" + ("; pod2-2: iperf3 -s" if iperf else ""))
        time.sleep(0.5)

        # Capture the inter-node link (tunnel port) for the whole run.
        pcap = os.path.join(mesh.workdir, "inter-node.pcap")
        dump = cluster.node("node1").popen(
            ["tcpdump", "-i", "eth0", "-U", "-n", "-s", "512", "-w", pcap, "tcp", "port", "15008"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
            if shutil.which("tcpdump") else None
        time.sleep(0.5)

        connections = 0
        section("HTTP with curl (same node and cross node, IPv4 and IPv6)")
        for src, dst, url_host in (("pod1-1", "pod1-2", cluster.pod("pod1-2").ip4),
                                   ("pod1-1", "pod2-1", cluster.pod("pod2-1").ip4),
                                   ("pod2-2", "pod2-1", f"[{cluster.pod('pod2-1').ip6}]"),
                                   ("pod2-2", "pod1-2", f"[{cluster.pod('pod1-2').ip6}]")):
            r = cluster.pod(src).run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10",
                                      "-w", "%{http_code} %{size_download}B %{time_total}s",
                                      f"http://{url_host}:8080/hello.txt"], check=False)
            connections += 1
            say(f"{src} -> {dst} http://{url_host}:8080/hello.txt : {r.stdout or r.stderr}")
            if not r.stdout.startswith("200"):
                problems.append(f"curl {src}->{dst} failed: {r.stdout} {r.stderr}")

        section("bulk transfers, checksummed both ways (half-close included)")
        for src, dst in (("pod1-1", "pod1-2"), ("pod1-2", "pod2-2"), ("pod2-1", "pod1-1")):
            r = cluster.pod(src).run(TOOLS + ["transfer", cluster.pod(dst).ip4, "7000",
                                              "--up", str(16 << 20), "--down", str(8 << 20)],
                                     check=False, timeout=60)
            connections += 1
            res = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout else {}
            peer = res.get("server_saw_peer")
            dnode = cluster.pod(dst).node
            via = "node proxy" if peer == cluster.node(dnode).gateway4 else "DIRECT?"
            say(f"{src} -> {dst}: 16 MiB up, 8 MiB down, intact={res.get('ok')}, "
                f"{res.get('seconds')}s; server saw peer {peer} ({via})")
            if not res.get("ok") or via != "node proxy":
                problems.append(f"transfer {src}->{dst}: {res or r.stderr}")

        if iperf:
            r = cluster.pod("pod1-1").run(["iperf3", "-c", cluster.pod("pod2-2").ip4, "-p",
                                           "5201", "-t", "2", "-J"], check=False, timeout=30)
            # iperf3 uses a control and a data connection
            connections += 2
            try:
                bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
                say(f"\niperf3 pod1-1 -> pod2-2 (cross node, through both proxies): "
                    f"{bps / 1e9:.2f} Gbit/s")
            except (ValueError, KeyError):
                problems.append(f"iperf3 failed: {r.stderr.strip()[-300:]}")

        section("evidence 0: the inter-node link carries mutual TLS, never plaintext")
        if dump is not None:
            time.sleep(0.5)
            dump.send_signal(signal.SIGINT)
            dump.wait(timeout=10)
            with open(pcap, "rb") as f:
                raw = f.read()
            records = raw.count(b"\x17\x03\x03")
            leaked = [w for w in (b"hello from a pod behind meshlet", b"GET /hello.txt")
                      if w in raw]
            say(f"tcpdump on node1 eth0, port 15008: {len(raw)} bytes captured, "
                f"{records} TLS application-data records, plaintext found: {leaked or 'none'}")
            if records == 0 or leaked:
                problems.append(f"inter-node capture: {records} TLS records, leaked {leaked}")
        for n in cluster.nodes:
            certs = ((mesh.status(n.name)["proxy"][0].get("stats") or {}).get("certs") or {})
            for c in certs.get("identities", []):
                say(f"{n.name} proxy holds {c.get('spiffe_id')} (expires {c.get('not_after')}, "
                    f"rotates {c.get('next_rotation')})")
        verified = [e for n in cluster.nodes for e in mesh.access_log(n.name)
                    if e.get("direction") == "inbound" and e.get("peer_verified")]
        say(f"inbound tunnel connections with a verified peer SPIFFE ID: {len(verified)}")
        for e in verified[:3]:
            say(f"   {e.get('src_identity')} -> {e.get('dst_pod')}")
        if not verified:
            problems.append("no inbound connection carried a verified peer identity")

        section("evidence 1: what the HTTP servers saw as their client")
        for name, path in http_logs.items():
            node = cluster.node(cluster.pod(name).node)
            with open(path) as f:
                peers = [ln.split(" - - ")[0] for ln in f if '"GET /hello.txt' in ln]
            say(f"{name}: requests from {sorted(set(peers))} "
                f"(node proxy = {node.gateway4} / {node.gateway6})")
            pod_ips = {ip for p in cluster.pods for ip in p.ips}
            if not peers or any(p.removeprefix("::ffff:") in pod_ips for p in peers):
                problems.append(f"{name} was reached directly by a pod: {peers}")

        section("evidence 2: the node proxies' connection logs")
        logged = 0
        for n in cluster.nodes:
            entries = mesh.access_log(n.name)
            for e in entries:
                say(f"{n.name}: " + json.dumps(e, separators=(",", ":"))[:220])
            logged += sum(1 for e in entries if e.get("direction") == "outbound")
        if logged < connections:
            problems.append(f"proxies logged {logged} outbound connections, clients made "
                            f"{connections}")

        section("evidence 3: kernel counters (per node, this run)")
        redirected = 0
        for n in cluster.nodes:
            after = mesh.counters(n.name)
            delta = {k: after[k] - before[n.name][k] for k in after if after[k] - before[n.name][k]}
            redirected += delta.get("redirect4", 0) + delta.get("redirect6", 0)
            say(f"{n.name}: {delta}")
        say(f"\nclient connections made: {connections}; redirected by eBPF: {redirected}; "
            f"logged by the proxies: {logged}")
        if redirected != connections:
            problems.append(f"eBPF redirected {redirected} connections, clients made "
                            f"{connections}")

        l7_demo(cluster, mesh, http_logs, problems)
        if not kubernetes:  # pods added on the fly: the inventory's way (issue #16)
            gateway_demo(cluster, mesh, problems)

        section("meshlet bpf status (node1)")
        # in node1's netns, where strict mode's clsact filters (kernels < 6.6) live
        r = cluster.node("node1").run([sys.executable, "-m", "agent.cli", "bpf", "status",
                                       "--pin-dir", mesh.agents["node1"].pin_dir], check=False)
        say(r.stdout.rstrip())
    except Exception as e:  # report, then tear down
        problems.append(f"{type(e).__name__}: {e}")
        if mesh is not None:
            for n in cluster.nodes:
                say(f"--- agent log {n.name} (tail) ---\n{mesh.agent_log(n.name)[-2000:]}")
                say(f"--- proxy log {n.name} (tail) ---\n{mesh.proxy_log(n.name)[-2000:]}")
    finally:
        section("teardown")
        if mesh is not None:
            mesh.down()
        if api is not None:
            api.stop()
            shutil.rmtree(api.workdir or "", ignore_errors=True)
        cluster.down()
        shutil.rmtree(webroot, ignore_errors=True)
        say("agents, proxies, pinned eBPF, namespaces and cgroups removed")

    if problems:
        section("FAILED")
        for p in problems:
            say(f"- {p}")
        return 1
    section("OK: every connection went through the node proxies, steered by eBPF")
    return 0


def cli(mesh, node: str, *args: str) -> subprocess.CompletedProcess:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--socket", sock],
                          capture_output=True, text=True, timeout=60)


POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: files-private, namespace: default}
spec:
  selector: {matchLabels: {app: files}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/private/*"]}}]
---
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: files-not-from-pod2-2, namespace: default}
spec:
  selector: {matchLabels: {app: files}}
  action: DENY
  rules:
  - from: [{source: {principals: [ns/default/sa/pod2-2]}}]
"""


def l7_demo(cluster, mesh, http_logs: dict, problems: list) -> None:
    """Service VIP, policy (L7 and kernel) and request metrics: issues #4-#6."""
    vip = service_vip(1)
    section(f"a service: files -> {vip}:80, endpoints pod1-2 and pod2-1 (one per node)")
    say(cli(mesh, "node1", "services").stdout.rstrip())
    before = {n: sum(1 for _ in open(p)) for n, p in http_logs.items()}
    urls = [f"http://{vip}/hello.txt?n={i}" for i in range(12)]
    r = cluster.pod("pod1-1").run(["curl", "-sS", "--max-time", "20", "-w", "%{http_code} ",
                                   *(["-o", "/dev/null"] * len(urls)), *urls], check=False, timeout=60)
    say(f"pod1-1: 12 requests on one connection to http://{vip}/ : {r.stdout.strip() or r.stderr}")
    served = {n: sum(1 for _ in open(p)) - before[n] for n, p in http_logs.items()}
    say(f"requests each endpoint's http.server logged: {served}")
    if r.stdout.split() != ["200"] * 12 or min(served.values()) < 1 or sum(served.values()) != 12:
        problems.append(f"service VIP: codes {r.stdout!r}, served {served}")

    path = os.path.join(mesh.workdir, "demo-policy.yaml")
    with open(path, "w") as f:
        f.write(POLICY)
    kubeconfig = getattr(mesh, "kubeconfig", "")
    if kubeconfig:  # Kubernetes mode: written once as custom resources, every node enforces them
        section("authorization policies, written to the cluster with the CLI (--kubeconfig)")
        a = subprocess.run([sys.executable, "-m", "agent.cli", "policy", "apply", "--kubeconfig", kubeconfig,
                            "-f", path], capture_output=True, text=True, timeout=120)
        say(a.stdout.strip())
        if a.returncode != 0:
            problems.append(f"policy apply to the cluster: {a.stdout} {a.stderr}")
        for n in mesh.agents:
            want = mesh.status(n)["policy"]
            say(f"{n}: {want['count']} policies from the cluster, version {want['version']}")
    else:
        section("authorization policies, applied with the CLI on both nodes")
        for n in mesh.agents:
            a = cli(mesh, n, "policy", "apply", "-f", path)
            say(f"{n}: {a.stdout.strip()}")
            if a.returncode != 0:
                problems.append(f"policy apply on {n}: {a.stdout} {a.stderr}")
    time.sleep(1.0)  # the proxies poll every 0.5 s (the kernel is already in force)
    host = cluster.pod("pod2-1").ip4
    r = cluster.pod("pod1-1").run(
        ["curl", "-sS", "--max-time", "10", "-w", " -> %{http_code}\\n", "-o", "/dev/stdout",
         "-o", "/dev/null", f"http://{host}:8080/private/keys", f"http://{host}:8080/hello.txt"],
        check=False, timeout=30)
    out = r.stdout.strip().replace("\n", " | ")
    say(f"pod1-1 -> pod2-1 GET /private/keys then /hello.txt, one connection: {out}")
    if "RBAC: access denied -> 403" not in r.stdout or "-> 200" not in r.stdout:
        problems.append(f"L7 policy: expected 403 then 200, got {r.stdout!r} {r.stderr!r}")
    r = cluster.pod("pod2-2").run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null",
                                   f"http://{host}:8080/hello.txt"], check=False, timeout=30)
    say(f"pod2-2 -> pod2-1 (denied by principal, decided in the kernel): {r.stderr.strip()}")
    if r.returncode != 7:  # curl: could not connect (EPERM from connect())
        problems.append(f"kernel policy: curl exit {r.returncode}, expected 7: {r.stderr}")
    st = mesh.status("node2")
    kernel = (st.get("policy") or {}).get("kernel") or {}
    say(f"node2 kernel policy: {json.dumps(kernel.get('denied') or kernel, sort_keys=True)[:300]}")

    section("Istio request metrics on node2's :15020 (destination reporter)")
    text = mesh.scrape("node2")
    rows = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")
            and 'reporter="destination"' in ln and 'destination_workload="files"' in ln]
    for ln in rows:
        labels = dict(kv.split("=", 1) for kv in ln[ln.index("{") + 1:ln.index("}")].split(",")
                      if "=" in kv)
        say(f"  istio_requests_total code={labels.get('response_code')} "
            f"flags={labels.get('response_flags')} from={labels.get('source_workload')} "
            f"service={labels.get('destination_service')} = {ln.rsplit(' ', 1)[1]}")
    if not any('response_code="403"' in ln for ln in rows):
        problems.append("no istio_requests_total with response_code 403 on node2")
    for name in ("files-private", "files-not-from-pod2-2"):
        if kubeconfig:
            subprocess.run([sys.executable, "-m", "agent.cli", "policy", "delete", "--kubeconfig", kubeconfig,
                            name, "-n", "default"], capture_output=True, text=True, timeout=60)
            continue
        for n in mesh.agents:
            cli(mesh, n, "policy", "delete", name)


GATEWAY_EXAMPLE = os.path.join(ROOT, "policies", "gateway")


def _demo_token(key, **claims) -> str:
    import jwt

    now = time.time()
    body = {"iss": "https://login.example", "sub": "alice", "aud": "shop", "exp": now + 300, "iat": now,
            "scope": "orders"}
    body.update(claims)
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "demo"})


def _gateway_policies(workdir: str, jwks_file: str) -> str:
    """policies/gateway/*.yaml into ``workdir``, the RequestAuthentication in
    its meshlet.io form with the demo's keys in ``jwks_file``."""
    out = os.path.join(workdir, "gateway-policies")
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(GATEWAY_EXAMPLE)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(GATEWAY_EXAMPLE, name)) as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "kind: RequestAuthentication" in "\n".join(lines):
                if line.startswith("apiVersion: security.istio.io/"):
                    lines[i] = "apiVersion: meshlet.io/v1alpha1"
                elif line.strip().startswith("jwks: "):
                    lines[i] = line[:line.index("jwks: ")] + f"jwksFile: {jwks_file}"
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


def gateway_demo(cluster, mesh, problems: list) -> None:
    """An API gateway and the mesh (issue #16): nginx in an enrolled pod,
    end-user JWTs checked by the mesh with one RequestAuthentication."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from agent.policy.gatewaylint import parse_gateway
    from agent.policy.load import read_sources
    from agent.sim.gateway import Location, access_log, locations_from_routes, start_nginx

    t0 = time.monotonic()
    section("an API gateway in front of the mesh: outside -> gateway -> frontend -> orders")
    for node, name, ns, app in (("node1", "gateway", "ingress", "gateway"),
                                ("node1", "orders-1", "shop", "orders"),
                                ("node2", "frontend-1", "shop", "frontend"),
                                ("node1", "outside", "outside", "client")):
        p = cluster.add_pod(node, name, namespace=ns, service_account=app, labels={"app": app})
        say(f"   pod {name:<10} {p.ip4:<13} namespace {ns:<8} on {node}"
            + ("  (not enrolled: the external client)" if name == "outside" else ""))
    mesh.unmeshed.add("outside")
    mesh.namespaces["shop"] = {"mode": "strict"}  # only mesh traffic reaches shop's pods
    http = [{"port": 80, "targetPort": 8080, "appProtocol": "http"}]
    mesh.services += [service("frontend", {"app": "frontend"}, http, index=2, namespace="shop"),
                      service("orders", {"app": "orders"}, http, index=3, namespace="shop")]
    mesh.write_inventory()
    want = {"node1": {"ingress/gateway", "shop/orders-1"}, "node2": {"shop/frontend-1"}}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
            not want[n] <= {e["pod"] for e in mesh.status(n)["enrolled"]} for n in want):
        time.sleep(0.2)
    say(f"services frontend -> {service_vip(2)}:80, orders -> {service_vip(3)}:80; namespace shop strict")

    orders_log = os.path.join(mesh.workdir, "orders-1.jsonl")
    p = cluster.pod("orders-1").popen(
        [sys.executable, "-m", "tests.support.podhttpd", "--name", "orders-1", "--port", "8080",
         "--log", orders_log, "--max-seconds", "300"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    p.stdout.readline()
    routes_dir = os.path.join(GATEWAY_EXAMPLE, "routes")
    vips = {("shop", "frontend", 80): service_vip(2)}
    locs = locations_from_routes(read_sources([routes_dir], parse_gateway),
                                 lambda ns, name, port: f"{vips[(ns, name, port)]}:{port}")
    gw_dir, fe_dir = os.path.join(mesh.workdir, "nginx-gateway"), os.path.join(mesh.workdir, "nginx-frontend")
    start_nginx(cluster.pod("gateway"), gw_dir, 8080, locs)
    start_nginx(cluster.pod("frontend-1"), fe_dir, 8080, [
        Location("/orders", upstreams=(f"{service_vip(3)}:80",)), Location("/", body="frontend home\n")])
    say(f"gateway: nginx, routes from {os.path.relpath(routes_dir, ROOT)}/shop.yaml: "
        + ", ".join(f"{loc.path} -> {' '.join(loc.upstreams)}" for loc in locs))
    say("orders-1: a small HTTP server that logs the headers it gets; frontend-1: nginx, "
        f"/orders/* -> {service_vip(3)}:80 with every header, the rest answered itself")

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "demo"
    jwks_file = os.path.join(mesh.workdir, "login.jwks")
    with open(jwks_file, "w") as f:
        json.dump({"keys": [jwk]}, f)
    docs = _gateway_policies(mesh.workdir, jwks_file)
    section("policies/gateway: one RequestAuthentication (root namespace), who may call whom")
    for n in mesh.agents:
        a = cli(mesh, n, "policy", "apply", "-f", docs)
        say(f"{n}: {a.stdout.strip()}")
        if a.returncode != 0:
            problems.append(f"gateway policy apply on {n}: {a.stdout} {a.stderr}")
    lint = subprocess.run([sys.executable, "-m", "agent.cli", "policy", "lint", GATEWAY_EXAMPLE, "--gateway",
                           routes_dir, "--gateway-identity", "ns/ingress/sa/gateway"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    say(f"meshlet policy lint policies/gateway --gateway policies/gateway/routes "
        f"--gateway-identity ns/ingress/sa/gateway: {lint.stdout.strip()} (exit {lint.returncode})")
    if lint.returncode != 0:
        problems.append(f"gateway lint: {lint.stdout} {lint.stderr}")
    deadline = time.monotonic() + 20
    for n in mesh.agents:  # the proxies poll the agent's policy version
        while time.monotonic() < deadline and any(
                ((w.get("stats") or {}).get("policy") or {}).get("version")
                != (mesh.status(n).get("policy") or {}).get("version") for w in mesh.status(n)["proxy"]):
            time.sleep(0.1)

    gw = cluster.pod("gateway").ip4

    def curl(src: str, url: str, tok: str | None = None, extra=(), max_time: int = 10) -> tuple[str, str]:
        hdr = ["-H", f"Authorization: Bearer {tok}"] if tok else []
        r = cluster.pod(src).run(["curl", "-sS", "--max-time", str(max_time), "-w", "\\n%{http_code}",
                                  *hdr, *extra, url], check=False, timeout=30)
        body, _, code = r.stdout.rpartition("\n")
        return code.strip() or "000", (body.strip() or r.stderr.strip())[:60]

    section("end users through the gateway (curl in the outside pod -> the gateway pod's address)")
    good = _demo_token(key)
    first = time.monotonic()
    while True:  # the new pods' first connections may wait for their certificates
        code, body = curl("outside", f"http://{gw}:8080/orders/42", good, ["-H", "X-Jwt-Sub: mallory"])
        if code == "200" or time.monotonic() - first > 20:
            break
        time.sleep(0.2)
    other = ec.generate_private_key(ec.SECP256R1())
    h, pl, sig = good.split(".")
    cases = [
        ("valid token, scope orders (and a forged X-Jwt-Sub)", "/orders/42", None, "200", (code, body)),
        ("no token, frontend's own page", "/", None, "200", None),
        ("no token, orders' path", "/orders/42", None, "403", None),
        ("token without scope orders", "/orders/42", _demo_token(key, scope="read"), "403", None),
        ("bad token: another key", "/orders/42", _demo_token(other), "401", None),
        ("bad token: tampered signature", "/orders/42", f"{h}.{pl}.{sig[::-1]}", "401", None),
        ("bad token: expired", "/orders/42", _demo_token(key, exp=time.time() - 600), "401", None),
    ]
    for what, path, tok, want_code, got in cases:
        code, body = got or curl("outside", f"http://{gw}:8080{path}", tok)
        say(f"  {what:<52} GET {path:<11} -> {code} {body}")
        if code != want_code:
            problems.append(f"gateway: {what}: {code} {body}, expected {want_code}")
    with open(orders_log) as f:
        seen = [json.loads(ln) for ln in f if ln.strip()]
    heads = seen[-1]["headers"] if seen else []
    sub = [v for k, v in heads if k == "x-jwt-sub"]
    say(f"orders-1 saw {len(seen)} request(s); x-jwt-sub {sub} (set by its node proxy from the token; "
        f"the client's copy removed), Authorization forwarded: {any(k == 'authorization' for k, _ in heads)}")
    if sub != ["alice"]:
        problems.append(f"orders-1 saw {seen}")

    section("around the gateway: denied by the mesh")
    code, body = curl("pod2-2", f"http://{service_vip(2)}/orders/42", good)
    say(f"  pod2-2 (default/pod2-2, enrolled) -> frontend {service_vip(2)}, valid token: {code} {body}")
    if code != "403":
        problems.append(f"pod2-2 -> frontend: {code} {body}, expected 403")
    fe = cluster.pod("frontend-1").ip4
    code, body = curl("outside", f"http://{fe}:8080/orders/42", good, max_time=1)
    say(f"  outside -> frontend-1 {fe}:8080 directly (strict namespace): {code} {body}")
    if code != "000":
        problems.append(f"outside -> frontend-1 directly: {code} {body}, expected no connection")

    section("evidence: identities and verdicts per hop (request lines of the access logs)")
    for n, pod in (("node2", "shop/frontend-1"), ("node1", "shop/orders-1")):
        for e in mesh.access_log(n):
            if e.get("direction") == "inbound" and e.get("dst_pod") == pod and e.get("kind") == "request":
                say(f"  {n} {e.get('src_identity')} -> {pod} {e.get('method')} {e.get('path')} "
                    f"-> {e.get('status')} flags {e.get('response_flags')}")
    ids = {e.get("src_identity") for e in mesh.access_log("node2")
           if e.get("dst_pod") == "shop/frontend-1" and e.get("status") == 200}
    if ids != {"spiffe://cluster.local/ns/ingress/sa/gateway"}:
        problems.append(f"frontend answered 200 to {ids}, expected only the gateway")
    for name, d in (("gateway", gw_dir), ("frontend-1", fe_dir)):
        for ln in access_log(d):
            say(f"  nginx {name}: {ln}")
    say(f"(gateway scene: {time.monotonic() - t0:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
