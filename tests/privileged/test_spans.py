"""Trace spans of the node proxies, received by an OTLP/HTTP collector, on a
real 2-node simulated cluster (issue #15, item 2).

A client pod on node1 calls a service VIP whose endpoint (``web-1``, a real
HTTP server) is on node2, with L7 on: the source node's proxy serves the
request at L7 (balancing, the CLIENT span) and the destination node's proxy
serves its leg at L7 again (the SERVER span).  The collector runs in node1's
network namespace on the node's address, so both proxies reach it; it is
first absent (port closed), then one that accepts and never answers, then a
real receiver decoding ``ExportTraceServiceRequest`` with the official
``opentelemetry-proto`` messages (tests/support/otlpsink.py).  Traffic must
not notice the first two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.podservers import repo_env
from tests.support.privileged import meshlet, require_privileged, wait_for

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh, service, service_vip  # noqa: E402

pytestmark = pytest.mark.privileged

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIP = service_vip(23)
COLLECTOR_PORT = 4318
TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"



class Env:
    def __init__(self, mesh: Mesh, logdir: str) -> None:
        self.mesh = mesh
        self.logdir = logdir
        self.collector: subprocess.Popen | None = None
        self.spans_file = os.path.join(logdir, "spans.jsonl")
        self.web_log = os.path.join(logdir, "web-1.jsonl")

    @property
    def node1(self):
        return self.mesh.cluster.node("node1")

    def start_collector(self, *extra: str) -> None:
        self.stop_collector()
        p = self.node1.popen(
            [sys.executable, "-m", "tests.support.otlpsink", "--listen", self.node1.address,
             "--port", str(COLLECTOR_PORT), "--out", self.spans_file, "--max-seconds", "600", *extra],
            stdout=subprocess.PIPE, text=True, env=repo_env(), cwd=ROOT)
        assert "listening" in p.stdout.readline()
        self.collector = p

    def stop_collector(self) -> None:
        p, self.collector = self.collector, None
        if p is not None:
            p.kill()
            p.wait(10)

    def spans(self) -> list[dict]:
        try:
            with open(self.spans_file) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def received(self) -> list[dict]:
        with open(self.web_log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def curl(self, *args: str, n: int = 1, path: str = "/traced") -> list[int]:
        """n requests on one client connection; their status codes."""
        urls: list[str] = []
        for i in range(n):
            urls += ["-o", "/dev/null", f"http://{VIP}{path}?i={i}"]
        r = self.mesh.cluster.pod("client").run(
            ["curl", "-sS", "--max-time", "20", "-w", "%{http_code}\\n", *args, *urls],
            check=False, timeout=120)
        assert r.returncode == 0, r.stderr + self.mesh.proxy_log("node1")[-2000:]
        return [int(c) for c in r.stdout.split()]

    def tracing_stats(self, node: str) -> dict:
        ws = self.mesh.status(node)["proxy"]
        assert len(ws) == 1
        return (ws[0].get("stats") or {}).get("tracing") or {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("spans"))
    cluster = Cluster(nodes=2, pod_specs={
        1: [{"name": "client", "labels": {"app": "client"}}],
        2: [{"name": "web-1", "labels": {"app": "web"}}],
    })
    address = cluster.node("node1").address
    mesh = Mesh(cluster, l7=True, services=[
        service("web", {"app": "web"}, [{"port": 80, "targetPort": 7000, "name": "http",
                                         "appProtocol": "http"}], index=23),
    ], tracing_settings={
        "otlpEndpoint": f"http://{address}:{COLLECTOR_PORT}",
        "sampleRate": 1.0,  # requests without a traceparent: every one sampled
        "maxQueue": 4,
        "maxBatch": 2,
        "exportTimeout": 1.0,
        "exportInterval": 0.1,
    })
    e = Env(mesh, logdir)
    try:
        cluster.up()
        open(e.web_log, "w").close()
        p = cluster.pod("web-1").popen(
            [sys.executable, "-m", "tests.support.podhttpd", "--name", "web-1", "--port", "7000",
             "--log", e.web_log, "--max-seconds", "600"],
            stdout=subprocess.PIPE, text=True, env=repo_env(), cwd=ROOT)
        assert "listening" in p.stdout.readline()
        mesh.start()
        yield e
    finally:
        e.stop_collector()
        mesh.down()
        cluster.down()


def sampled(i: int) -> str:
    return f"traceparent: 00-{TRACE[:-4]}{i:04x}-{CLIENT_SPAN}-01"


def test_a_collector_that_is_down_changes_nothing_for_traffic(env):
    codes = env.curl("-H", sampled(1), n=40)
    assert codes == [200] * 40
    wait_for(lambda: env.tracing_stats("node1").get("export_failures", 0) >= 1,
             "node1's proxy counts failed exports", timeout=30)
    wait_for(lambda: env.tracing_stats("node2").get("export_failures", 0) >= 1,
             "node2's proxy counts failed exports", timeout=30)
    st = env.tracing_stats("node1")
    assert st["exported"] == 0
    assert st["recorded"] + st["dropped"] == 40  # one CLIENT span per request, queued or dropped


def test_a_collector_that_never_answers_changes_nothing_for_traffic(env):
    env.start_collector("--hang")
    try:
        before = env.tracing_stats("node1")
        codes = env.curl("-H", sampled(2), n=60)
        assert codes == [200] * 60
        # The export thread is stuck up to exportTimeout per batch of 2 and the
        # queue holds 4: most of the 60 spans cannot wait, and are counted.
        after = env.tracing_stats("node1")
        assert after["dropped"] > before["dropped"]
        wait_for(lambda: env.tracing_stats("node1")["export_failures"] > before["export_failures"],
                 "node1's proxy counts the exports that timed out", timeout=30)
        st = env.tracing_stats("node1")
        assert st["exported"] == 0
        r = meshlet(env.mesh, "node1", "status")  # what an operator sees
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if "trace spans to" in ln)
        assert f":{COLLECTOR_PORT}/v1/traces: exported 0, dropped " in line
        assert int(line.split("dropped ")[1].split()[0]) >= after["dropped"] > 0
    finally:
        env.stop_collector()


def test_one_request_across_nodes_gives_two_linked_spans(env):
    env.start_collector()
    mesh = env.mesh
    client_id = f"spiffe://cluster.local/{mesh.cluster.pod('client').spiffe_path}"
    web_id = f"spiffe://cluster.local/{mesh.cluster.pod('web-1').spiffe_path}"
    web_ip = mesh.cluster.pod("web-1").ip4
    tid = TRACE
    unsampled = "1af7651916cd43dd8448eb211c80319c"
    # An unsampled trace first: with both proxies' queues in order, its absence
    # is known once the sampled request's spans have arrived.
    assert env.curl("-H", f"traceparent: 00-{unsampled}-{CLIENT_SPAN}-00", path="/unsampled") == [200]
    assert env.curl("-H", f"traceparent: 00-{tid}-{CLIENT_SPAN}-01", path="/traced") == [200]

    def ours(spans):
        return [s for s in spans if s["trace_id"] == tid]

    wait_for(lambda: len(ours(env.spans())) >= 2, "both proxies' spans at the collector", timeout=30)
    got = ours(env.spans())
    assert sorted(s["kind"] for s in got) == ["client", "server"], got
    cli = next(s for s in got if s["kind"] == "client")
    srv = next(s for s in got if s["kind"] == "server")
    # The source proxy's span is the child of the client's, the destination's of the source's.
    assert cli["parent_span_id"] == CLIENT_SPAN
    assert srv["parent_span_id"] == cli["span_id"] != srv["span_id"]
    assert cli["resource"]["k8s.node.name"] == "node1" and srv["resource"]["k8s.node.name"] == "node2"
    # What the app received names the destination proxy's span as its parent.
    tp = [r["traceparent"] for r in env.received() if r["path"].startswith("/traced")]
    assert tp[-1] == f"00-{tid}-{srv['span_id']}-01"
    for s in (cli, srv):
        a = s["attributes"]
        assert s["name"] == "GET" and s["status"] == "unset"
        assert a["http.request.method"] == "GET" and a["http.response.status_code"] == 200
        assert a["url.path"] == "/traced" and a["server.address"] == VIP
        assert a["meshlet.source.principal"] == client_id
        assert a["meshlet.destination.principal"] == web_id
        assert a["meshlet.upstream"] == f"{web_ip}:7000"
        assert a["meshlet.response_flags"] == "-"
        assert s["start"] <= s["end"]
    assert cli["attributes"]["meshlet.route"] == "service"
    assert cli["attributes"]["meshlet.cluster"] == "default/web:80"
    assert cli["attributes"]["network.peer.address"] == web_ip
    assert srv["attributes"]["meshlet.route"] == "local"
    assert srv["start"] >= cli["start"] - 1_000_000_000  # two clocks of one machine
    assert not [s for s in env.spans() if s["trace_id"] == unsampled]  # the flag said no


def test_a_request_without_traceparent_is_sampled_at_the_rate(env):
    env.start_collector()
    assert env.curl(path="/fresh") == [200]
    tp = [r["traceparent"] for r in env.received() if r["path"].startswith("/fresh")][-1]
    tid, parent = tp.split("-")[1:3]
    assert tp.endswith("-01")  # sampleRate 1: the new trace goes out sampled

    def ours(spans):
        return [s for s in spans if s["trace_id"] == tid]

    wait_for(lambda: len(ours(env.spans())) >= 2, "both proxies' spans of the new trace", timeout=30)
    got = {s["kind"]: s for s in ours(env.spans())}
    assert got["client"]["parent_span_id"] == ""  # the root of the new trace
    assert got["server"]["parent_span_id"] == got["client"]["span_id"]
    assert got["server"]["span_id"] == parent
    for node in ("node1", "node2"):
        st = env.tracing_stats(node)
        assert st["exported"] >= 1 and st["endpoint"].endswith("/v1/traces")
