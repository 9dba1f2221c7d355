"""Observability end to end (#6) on a real 2-node simulated cluster: known
traffic shows up, exactly, in /metrics (parsed with prometheus-client's own
parser), `meshlet stats`, `meshlet flows` and the access log.

Byte counts here are the proxy's application bytes: the transfer tool's
client sends a JSON header line and its payload; the server answers a JSON
reply line and its payload.  (The kernel's counters in test_flows.py add
SYN/FIN.)

The mesh runs with ``proxy.l7: true``: the L4 tools (not HTTP) stay on the
L4 relay, and HTTP requests to a small server in pod1-2 (same node) and
pod2-1 (cross node) are counted per request: istio_requests_total and the
duration histogram in /metrics, the L7 columns of `meshlet stats`, and one
access-log line per request.  A request refused by an authorization policy
(DENY /admin) counts in meshlet_denied_requests_total under that policy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.privileged import TOOLS, require_privileged, running_mesh, wait_for

require_privileged()

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

TD = "spiffe://cluster.local/ns/default/sa"
ISTIO_TCP = ("istio_tcp_connections_opened", "istio_tcp_connections_closed",
             "istio_tcp_received_bytes", "istio_tcp_sent_bytes")


HTTP_PORT = 8080

HTTP_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        ok = self.path.split("?")[0] in ("/ok", "/admin")
        body = b"fine\n" if ok else b"nothing here\n"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
srv.timeout = 1
print("listening", flush=True)
import time
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    srv.handle_request()
"""

HTTP_CLIENT = r"""
import http.client, json, sys
host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(host, port, timeout=10)
out = []
for i, path in enumerate(sys.argv[4:]):
    c.request("GET", path, headers={"X-Request-Id": f"{tag}-{i}"})
    r = c.getresponse()
    r.read()
    out.append(r.status)
c.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh():
    with running_mesh(Cluster(nodes=2, pods_per_node=2), (("serve", 7000), ("echo", 7001)),
                      max_seconds=600, l7=True,
                      pod_servers=(("pod1-2", "pod2-1"),
                                   [sys.executable, "-c", HTTP_SERVER, str(HTTP_PORT), "600"])) as m:
        yield m


def ip(mesh, pod: str) -> str:
    return mesh.cluster.pod(pod).ip4


def transfer(mesh, src: str, dst: str, up: int, down: int, seed: int) -> tuple[int, int]:
    """Run one transfer; the application bytes (source -> destination, back)."""
    r = mesh.cluster.pod(src).run(TOOLS + ["transfer", ip(mesh, dst), "7000", "--up", str(up),
                                           "--down", str(down), "--seed", str(seed)],
                                  check=False, timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"], res
    header = len(json.dumps({"down": down, "seed": seed})) + 1
    reply = len(json.dumps({"received": res["server_received"], "sha256": "0" * 64,
                            "peer": res["server_saw_peer"]})) + 1
    return header + up, reply + down


def samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Parsed with prometheus-client's parser: family -> [(labels, value)]."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, [])
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[fam.name].append((s.labels, s.value))
    return out


def tcp(parsed: dict, reporter: str, src: str, dst: str) -> dict[str, float]:
    """The four istio_tcp_* values of one pair, summed over its label sets."""
    out = {}
    for name in ISTIO_TCP:
        out[name] = sum(v for lb, v in parsed.get(name, ())
                        if lb["reporter"] == reporter and lb["source_workload"] == src
                        and lb["destination_workload"] == dst)
    return out


def total(parsed: dict, family: str) -> float:
    return sum(v for _, v in parsed.get(family, ()))


def requests_by(parsed: dict, reporter: str, src: str, dst: str) -> dict[str, float]:
    """istio_requests_total of one pair and reporter, by response_code."""
    out: dict[str, float] = {}
    for lb, v in parsed.get("istio_requests", ()):
        if (lb["reporter"], lb["source_workload"], lb["destination_workload"]) == (reporter, src, dst):
            out[lb["response_code"]] = out.get(lb["response_code"], 0) + v
    return out


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def stats_json(mesh, node: str, *args: str) -> list[dict]:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "stats", "--socket", sock, "-o", "json",
                        *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def flows_json(mesh, node: str, *args: str) -> list[dict]:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--socket", sock, "-o", "json",
                        *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)




def open_session(mesh, src: str, dst: str, rounds: int):
    """A held-open echo connection after ``rounds`` round trips of 1000 bytes."""
    p = mesh.cluster.pod(src).popen(TOOLS + ["session", ip(mesh, dst), "7001"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = json.loads(p.stdout.readline())["connected"][1]
    for _ in range(rounds):
        p.stdin.write("x" * 999 + "\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline())["echo"] == "x" * 999
    return p, port


def close_session(p) -> None:
    p.stdin.close()
    p.wait(timeout=10)


def test_known_traffic_in_metrics_stats_flows_and_access_log(mesh):
    before = {n: samples(mesh.scrape(n)) for n in ("node1", "node2")}
    log_before = {n: len(mesh.access_log(n)) for n in ("node1", "node2")}
    session, sport = open_session(mesh, "pod1-2", "pod2-2", rounds=5)  # held open, cross node
    local_s, local_port = open_session(mesh, "pod1-1", "pod1-2", rounds=1)  # held open, same node
    try:
        same = [transfer(mesh, "pod1-1", "pod1-2", 100_000 + i, 50_000 + 7 * i, seed=i)
                for i in range(3)]
        cross = [transfer(mesh, "pod1-1", "pod2-1", 300_000 + i, 20_000 + i, seed=10 + i)
                 for i in range(2)]
        up_same, down_same = sum(u for u, _ in same), sum(d for _, d in same)
        up_cross, down_cross = sum(u for u, _ in cross), sum(d for _, d in cross)
        after = {n: samples(mesh.scrape(n)) for n in ("node1", "node2")}

        # -- /metrics: exact per pair and reporter --------------------------------------
        d = {(n, r, s, t): delta(tcp(before[n], r, s, t), tcp(after[n], r, s, t))
             for n, r, s, t in [("node1", "source", "pod1-1", "pod1-2"),
                                ("node1", "destination", "pod1-1", "pod1-2"),
                                ("node1", "source", "pod1-1", "pod2-1"),
                                ("node2", "destination", "pod1-1", "pod2-1"),
                                ("node1", "source", "pod1-2", "pod2-2"),
                                ("node2", "destination", "pod1-2", "pod2-2")]}
        # same node: the one proxy reports as source and as destination; the
        # held-open session adds one opened, not closed connection and 1000 B each way
        for rep in ("source", "destination"):
            assert d[("node1", rep, "pod1-1", "pod1-2")] == {
                "istio_tcp_connections_opened": 4, "istio_tcp_connections_closed": 3,
                "istio_tcp_received_bytes": up_same + 1000, "istio_tcp_sent_bytes": down_same + 1000}
        want_cross = {"istio_tcp_connections_opened": 2, "istio_tcp_connections_closed": 2,
                      "istio_tcp_received_bytes": up_cross, "istio_tcp_sent_bytes": down_cross}
        assert d[("node1", "source", "pod1-1", "pod2-1")] == want_cross
        assert d[("node2", "destination", "pod1-1", "pod2-1")] == want_cross
        want_open = {"istio_tcp_connections_opened": 1, "istio_tcp_connections_closed": 0,
                     "istio_tcp_received_bytes": 5000, "istio_tcp_sent_bytes": 5000}
        assert d[("node1", "source", "pod1-2", "pod2-2")] == want_open
        assert d[("node2", "destination", "pod1-2", "pod2-2")] == want_open

        # standard labels, Istio's values
        def labels_of(n, r, s, t):
            return [lb for lb, _ in after[n]["istio_tcp_connections_opened"]
                    if (lb["reporter"], lb["source_workload"], lb["destination_workload"]) == (r, s, t)]
        (lb,) = labels_of("node1", "source", "pod1-1", "pod2-1")
        assert lb["connection_security_policy"] == "mutual_tls"
        assert lb["source_principal"] == f"{TD}/pod1-1"
        assert lb["destination_principal"] == f"{TD}/pod2-1"
        assert lb["source_workload_namespace"] == lb["destination_workload_namespace"] == "default"
        assert lb["destination_service"] == ip(mesh, "pod2-1")
        assert lb["request_protocol"] == "tcp" and lb["response_flags"] == "-"
        (lb2,) = labels_of("node2", "destination", "pod1-1", "pod2-1")
        assert lb2["connection_security_policy"] == "mutual_tls"
        assert lb2["source_principal"] == f"{TD}/pod1-1"  # verified from the client certificate
        for r in ("source", "destination"):
            (lb3,) = labels_of("node1", r, "pod1-1", "pod1-2")  # ports 7000 and 7001: one service
            assert lb3["connection_security_policy"] == "none"  # never leaves the node
        # L4 tools are not HTTP: with l7 on they stay on the relay, no request is counted
        for n in ("node1", "node2"):
            assert total(after[n], "istio_requests") == total(before[n], "istio_requests"), n

        # meshlet_* for the agent itself
        m1 = after["node1"]
        gauge = {(f, tuple(sorted(lb.items()))): v for f in m1 for lb, v in m1[f]}
        assert gauge[("meshlet_bpf_map_entries", (("map", "ml_enrolled"),))] == 2
        assert gauge[("meshlet_bpf_map_capacity", (("map", "ml_live_flows"),))] > 0
        assert gauge[("meshlet_bpf_map_entries", (("map", "ml_live_flows"),))] >= 4  # 2 open conns
        assert gauge[("meshlet_datapath_events", (("event", "redirect4"),))] >= 7
        assert gauge[("meshlet_proxy_workers_up", ())] == 1
        # node2 accepted node1's tunnels; its worker picks them by load (the program loaded)
        tun = {lb["worker"]: (lb["pick"], v) for lb, v in after["node2"]["meshlet_proxy_tunnel_connections"]}
        assert set(tun) == {"0"} and tun["0"][0] == "least-loaded", tun
        # and node1's worker picks the pods' connections by load
        conns = {lb["worker"]: lb["pick"] for lb, v in m1["meshlet_proxy_worker_connections"]}
        assert conns == {"0": "least-loaded"}, conns
        assert gauge[("meshlet_trust_bundle_roots", ())] == 1
        expiry = {lb["spiffe_id"]: v for lb, v in m1["meshlet_workload_certificate_expiry_timestamp_seconds"]}
        assert set(expiry) == {f"{TD}/pod1-1", f"{TD}/pod1-2"}
        assert all(time.time() < t < time.time() + 2 * 86400 for t in expiry.values())
        hs = {lb["result"]: v for lb, v in m1["meshlet_tls_handshakes"]}
        # the pooled tunnel: one TLS connection per (source, destination) identity pair, here
        # pod1-2 -> pod2-2 and pod1-1 -> pod2-1, carrying the 3 cross-node connections as streams
        assert hs["full"] + hs["resumed"] >= 2 and hs["refused"] == 0

        def tunnel(n, family):
            return {lb["direction"]: v for lb, v in after[n][family]}, {
                lb["direction"]: v for lb, v in before[n].get(family, [])}
        (s_now, s_then), (c_now, c_then) = (tunnel("node1", "meshlet_tunnel_streams"),
                                            tunnel("node1", "meshlet_tunnel_connections"))
        assert s_now["out"] - s_then.get("out", 0) == 3
        assert c_now["out"] - c_then.get("out", 0) <= 2
        assert {lb["reason"] for lb, _ in m1["meshlet_denied_connections"]} >= {
            "unknown_source", "mtls_refused", "forbidden_destination"}
        assert gauge[("meshlet_metrics_overflow", ())] == 0

        # -- meshlet stats: the same numbers, plus kernel RTT --------------------------
        rows = {(r["source"]["workload"], r["destination"]["workload"]): r
                for r in stats_json(mesh, "node1", "--from", "default/pod1-1")}
        assert set(rows) >= {("pod1-1", "pod1-2"), ("pod1-1", "pod2-1")}
        assert all(k[0] == "pod1-1" for k in rows)
        now = samples(mesh.scrape("node1"))
        for (s, t), row in rows.items():
            m = tcp(now, "source", s, t)
            assert row["connections"]["total"] == m["istio_tcp_connections_opened"]
            assert row["connections"]["active"] == (m["istio_tcp_connections_opened"]
                                                    - m["istio_tcp_connections_closed"])
            assert row["bytes"] == {"sent": m["istio_tcp_received_bytes"],
                                    "received": m["istio_tcp_sent_bytes"]}
            assert 0 < row["tcp_rtt_us"]["p50"] <= row["tcp_rtt_us"]["max"] < 1_000_000
            reqs = requests_by(now, "source", s, t)
            assert row["requests"] == (sum(reqs.values()) or None)
        assert rows[("pod1-1", "pod2-1")]["security"] == "mutual_tls"
        assert rows[("pod1-1", "pod1-2")]["connections"]["active"] >= 1
        only = stats_json(mesh, "node1", "--from", "pod1-1", "--to", "pod2-1")
        assert [(r["source"]["workload"], r["destination"]["workload"]) for r in only] == \
            [("pod1-1", "pod2-1")]
        node2_rows = stats_json(mesh, "node2", "--to", "pod2-1")  # the destination's view
        assert node2_rows and node2_rows[0]["reporter"] == "destination"

        # -- meshlet flows: the proxy linked its legs, so all four join ------------------
        def four_legs():
            fl = flows_json(mesh, "node1", "--state", "open", "--port", "7001")
            srv = [f for f in fl if f["role"] == "server"
                   and f["destination"]["pod"] == "default/pod1-2"
                   and f["source"]["pod"] == "default/pod1-1"]
            client = [f for f in fl if f["role"] == "client" and f["source"]["port"] == local_port]
            return (srv, client) if srv and client else None
        srv, client = wait_for(four_legs, "the server leg resolved to its client pod")
        assert srv[0]["via"]["kind"] == "proxy"

        # -- access log: one line per connection, same bytes and labels -----------------
        new1 = mesh.access_log("node1")[log_before["node1"]:]
        new2 = mesh.access_log("node2")[log_before["node2"]:]
        loc = [e for e in new1 if (e["src_pod"], e["dst_pod"]) == ("default/pod1-1", "default/pod1-2")]
        assert sorted((e["bytes_sent"], e["bytes_received"]) for e in loc) == sorted(same)
        assert all(e["connection_security_policy"] == "none" and e["source_workload"] == "pod1-1"
                   and e["destination_workload"] == "pod1-2" and e["result"] == "ok" for e in loc)
        out = [e for e in new1 if e["dst_pod"] == "default/pod2-1"]
        inn = [e for e in new2 if e["dst_pod"] == "default/pod2-1"]
        for lines in (out, inn):
            assert sorted((e["bytes_sent"], e["bytes_received"]) for e in lines) == sorted(cross)
            assert all(e["connection_security_policy"] == "mutual_tls"
                       and e["source_principal"] == f"{TD}/pod1-1" for e in lines)
    finally:
        close_session(session)
        close_session(local_s)
    # closing the held-open connections: closed counts catch up exactly
    def closed_now():
        m = delta(tcp(before["node2"], "destination", "pod1-2", "pod2-2"),
                  tcp(samples(mesh.scrape("node2")), "destination", "pod1-2", "pod2-2"))
        return m if m["istio_tcp_connections_closed"] == 1 else None
    assert wait_for(closed_now, "the session's close")["istio_tcp_received_bytes"] == 5000


def test_denied_connection_is_counted_with_its_reason(mesh):
    # A meshed pod dialing a node's tunnel port itself is refused by its own
    # node proxy (it could otherwise claim any identity).
    def denied(node):
        return {lb["reason"]: v for lb, v in samples(mesh.scrape(node))["meshlet_denied_connections"]}
    before = denied("node1")
    r = mesh.cluster.pod("pod1-1").run(TOOLS + ["probe", mesh.cluster.node("node2").address,
                                                "15008"], check=False, timeout=30)
    res = json.loads(r.stdout)  # the proxy's RST may beat connect() back to userspace
    assert res["result"] in ("reset", "eof") or res.get("errno") == 104, res
    after = denied("node1")
    assert after["forbidden_destination"] - before["forbidden_destination"] == 1
    assert {k: v for k, v in after.items() if k != "forbidden_destination"} == \
        {k: v for k, v in before.items() if k != "forbidden_destination"}
    line = [e for e in mesh.access_log("node1") if e.get("deny_reason") == "forbidden_destination"]
    assert line and line[-1]["result"] == "rejected" and line[-1]["src_pod"] == "default/pod1-1"


def test_access_log_off_and_sampling_zero_write_nothing(mesh):
    path = os.path.join(mesh.agents["node1"].run_dir, "access.log")
    try:
        for setting in ({"enabled": False}, {"sampling": 0.0}):
            mesh.reconfigure(access_log_settings=setting)
            size = os.path.getsize(path)
            n2 = len(mesh.access_log("node2"))
            transfer(mesh, "pod1-1", "pod1-2", 1000, 1000, seed=1)
            transfer(mesh, "pod1-2", "pod2-1", 1000, 1000, seed=2)
            assert os.path.getsize(path) == size, setting
            assert len(mesh.access_log("node2")) == n2, setting
            st = mesh.status("node1")["proxy"][0]["stats"]
            if setting.get("sampling") == 0.0:
                assert st["counters"]["access_log_skipped"] >= 2
                assert st["access_log"] == {"path": path, "sampling": 0.0}
            else:
                assert st["access_log"]["path"] is None
    finally:
        mesh.reconfigure(access_log_settings={})
    transfer(mesh, "pod1-1", "pod1-2", 1000, 1000, seed=3)  # back on: logged again
    assert wait_for(lambda: os.path.getsize(path) > size, "an access log line")


# --- HTTP requests (proxy.l7) ------------------------------------------------------------

PATHS = ["/ok", "/missing", "/ok?page=2", "/ok", "/gone", "/x/../ok", "/ok"]
CODES = [200, 404, 200, 200, 404, 200, 200]


def http_requests(mesh, src: str, dst: str, tag: str, paths: list[str]) -> list[int]:
    """One keep-alive connection from ``src``; the status of each request."""
    r = mesh.cluster.pod(src).run([sys.executable, "-c", HTTP_CLIENT, ip(mesh, dst), str(HTTP_PORT),
                                   tag, *paths], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def duration(text: str, reporter: str, src: str, dst: str, code: str) -> tuple[float, float]:
    """(count, sum) of istio_request_duration_milliseconds for one pair,
    reporter and response code."""
    count = total_ms = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name != "istio_request_duration_milliseconds":
            continue
        assert fam.type == "histogram"
        for s in fam.samples:
            lb = s.labels
            if (lb["reporter"], lb["source_workload"], lb["destination_workload"],
                    lb["response_code"]) != (reporter, src, dst, code):
                continue
            if s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_sum"):
                total_ms += s.value
    return count, total_ms


@pytest.mark.parametrize("dst,node,reporters,security", [
    ("pod1-2", "node1", ("source", "destination"), "none"),
    ("pod2-1", "node2", ("destination",), "mutual_tls"),
], ids=["same-node", "cross-node"])
def test_http_requests_in_metrics_stats_and_access_log(mesh, dst, node, reporters, security):
    tag = f"obs-{dst}-{time.monotonic_ns()}"
    before_text = mesh.scrape(node)
    before = samples(before_text)
    log_before = len(mesh.access_log(node))
    assert http_requests(mesh, "pod1-1", dst, tag, PATHS) == CODES
    after_text = mesh.scrape(node)
    after = samples(after_text)
    want = {"200": CODES.count(200), "404": CODES.count(404)}

    # -- /metrics: exact request counts per reporter and code, durations plausible ------
    for rep in ("source", "destination"):
        got = {c: requests_by(after, rep, "pod1-1", dst).get(c, 0)
                  - requests_by(before, rep, "pod1-1", dst).get(c, 0) for c in want}
        assert got == (want if rep in reporters else {"200": 0, "404": 0}), (rep, got)
        if rep not in reporters:
            continue
        for code, n in want.items():
            c0, s0 = duration(before_text, rep, "pod1-1", dst, code)
            c1, s1 = duration(after_text, rep, "pod1-1", dst, code)
            assert c1 - c0 == n
            assert 0 < s1 - s0 < n * 10_000  # ms: positive, below the client's timeout
        (lb,) = {tuple(sorted(lb.items())) for lb, _ in after["istio_requests"]
                 if (lb["reporter"], lb["source_workload"], lb["destination_workload"],
                     lb["response_code"]) == (rep, "pod1-1", dst, "404")}
        lb = dict(lb)
        assert lb["request_protocol"] == "http" and lb["response_flags"] == "-"
        assert lb["grpc_response_status"] == ""
        assert lb["connection_security_policy"] == security
        assert lb["source_principal"] == f"{TD}/pod1-1" and lb["destination_principal"] == f"{TD}/{dst}"
        assert lb["source_workload_namespace"] == lb["destination_workload_namespace"] == "default"
        assert lb["destination_service"] == ip(mesh, dst)

    # -- meshlet stats -o json: the same numbers, success rate, latency percentiles -------
    (row,) = stats_json(mesh, node, "--from", "pod1-1", "--to", dst)
    rep = row["reporter"]
    total_by_code = requests_by(samples(mesh.scrape(node)), rep, "pod1-1", dst)
    assert row["requests"] == sum(total_by_code.values()) >= len(PATHS)
    ok = sum(v for c, v in total_by_code.items() if int(c) < 500)
    assert row["success_rate"] == pytest.approx(ok / row["requests"])
    lat = row["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] < 10_000
    if node == "node2":  # the client's node relays cross-node HTTP at L4: not measured there
        (src_row,) = stats_json(mesh, "node1", "--from", "pod1-1", "--to", dst)
        assert src_row["requests"] is None and src_row["latency_ms"]["p50"] is None

    # -- access log: one line per request, then the connection's line at close ----------
    def lines():
        new = mesh.access_log(node)[log_before:]
        reqs = [e for e in new if e.get("kind") == "request"
                and str(e.get("request_id", "")).startswith(tag)]
        conn = [e for e in new if e.get("kind") != "request" and e.get("dst_pod") == f"default/{dst}"
                and e.get("reason", "").startswith("http:")]
        return (reqs, conn) if conn else None
    reqs, conn = wait_for(lines, "the connection's access-log line")
    assert [e["request_id"] for e in reqs] == [f"{tag}-{i}" for i in range(len(PATHS))]  # once each
    assert [e["status"] for e in reqs] == CODES
    assert [e["path"] for e in reqs] == ["/ok", "/missing", "/ok", "/ok", "/gone", "/ok", "/ok"]
    for e in reqs:
        assert e["method"] == "GET" and e["authority"] == f"{ip(mesh, dst)}:{HTTP_PORT}"
        assert 0 < e["duration_ms"] < 10_000
        assert e["src_pod"] == "default/pod1-1" and e["dst_pod"] == f"default/{dst}"
        assert e["source_principal"] == f"{TD}/pod1-1"
        assert e["connection_security_policy"] == security and e["response_flags"] == "-"
    assert len(conn) == 1 and conn[0]["reason"] == f"http: {len(PATHS)} request(s)"


DENY_ADMIN = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: pod1-2}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin]}}]
"""


def policy_cli(mesh, node: str, *args: str) -> None:
    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "policy", *args, "--socket", sock],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_request_denied_by_policy_is_counted_under_the_policy(mesh, tmp_path):
    f = tmp_path / "deny-admin.yaml"
    f.write_text(DENY_ADMIN)
    before = samples(mesh.scrape("node1"))
    tag = f"deny-{time.monotonic_ns()}"
    policy_cli(mesh, "node1", "apply", "-f", str(f))
    try:
        def applied():
            st = mesh.status("node1")["proxy"][0]["stats"]["policy"]
            return st["count"] >= 1
        wait_for(applied, "the proxy to load the policy")
        codes = http_requests(mesh, "pod1-1", "pod1-2", tag, ["/ok", "/admin", "/ok", "/admin"])
    finally:
        policy_cli(mesh, "node1", "delete", "deny-admin", "-n", "default")
    assert codes == [200, 403, 200, 403]
    after = samples(mesh.scrape("node1"))

    def denied(parsed):
        return {lb["policy"]: v for lb, v in parsed.get("meshlet_denied_requests", ())}
    assert denied(after).get("default/deny-admin", 0) - denied(before).get("default/deny-admin", 0) == 2
    flagged = {lb["reporter"]: v for lb, v in after["istio_requests"]
               if lb["response_code"] == "403" and lb["response_flags"] == "RBAC"
               and lb["destination_workload"] == "pod1-2"}
    was = {lb["reporter"]: v for lb, v in before.get("istio_requests", ())
           if lb["response_code"] == "403" and lb["response_flags"] == "RBAC"
           and lb["destination_workload"] == "pod1-2"}
    assert {r: v - was.get(r, 0) for r, v in flagged.items()} == {"source": 2, "destination": 2}
    lines = [e for e in mesh.access_log("node1") if e.get("kind") == "request"
             and str(e.get("request_id", "")).startswith(tag)]
    assert [(e["path"], e["status"], e.get("policy")) for e in lines] == [
        ("/ok", 200, None), ("/admin", 403, "default/deny-admin"),
        ("/ok", 200, None), ("/admin", 403, "default/deny-admin")]
    assert all(e["response_flags"] == "RBAC" and e["verdict"] == "denied"
               for e in lines if e["status"] == 403)
