"""proxy.l7 end to end: a real 2-node cluster with ``l7: true``.

curl in pod1-1 talks HTTP/1.1 to a Python ``http.server`` (which answers
with the request headers it received, as JSON) in pod1-2 (same node: the
Local route) and in pod2-1 (cross node: the mTLS tunnel). The destination
node's proxy sniffs HTTP and serves it with the L7 session: the upstream
sees a ``traceparent``, and requests on one client connection reuse one
pooled upstream connection (the proxy's stats count it). The L4 transfer
tool (not HTTP) still works with l7 on.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.privileged import gateway, ip_of, require_privileged, running_mesh, transfer

require_privileged()

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

HTTP_PORT = 8080

SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({"path": self.path, "peer": self.client_address[0],
                           "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
print("listening", flush=True)
srv.serve_forever()
"""


@pytest.fixture(scope="module")
def mesh():
    with running_mesh(Cluster(nodes=2, pods_per_node=2), (("serve", 7000),), l7=True,
                      pod_servers=(("pod1-2", "pod2-1"), [sys.executable, "-c", SERVER, str(HTTP_PORT)])) as m:
        yield m


def http_stats(mesh, node: str) -> dict:
    (w,) = mesh.status(node)["proxy"]  # one worker
    return w["stats"]["http"]


def curl(mesh, src: str, urls: list[str]) -> list[dict]:
    """One curl process: the URLs go over one keep-alive connection."""
    r = mesh.cluster.pod(src).run(["curl", "-sS", "--fail", "--max-time", "10"] + urls,
                                  check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("dst,node", [("pod1-2", "node1"), ("pod2-1", "node2")],
                         ids=["same-node", "cross-node"])
def test_http_through_the_l7_session(mesh, dst, node):
    before = http_stats(mesh, node)
    base = f"http://{ip_of(mesh, dst)}:{HTTP_PORT}"
    out = curl(mesh, "pod1-1", [f"{base}/a", f"{base}/b", f"{base}/c"])
    assert [o["path"] for o in out] == ["/a", "/b", "/c"]  # curl --fail: all 200
    for o in out:
        headers = dict(o["headers"])
        assert headers["traceparent"].startswith("00-") and len(headers["traceparent"]) == 55
        assert "x-request-id" in headers
        assert o["peer"] == gateway(mesh, node)  # delivered by the destination node's proxy
    after = http_stats(mesh, node)
    assert after["connections"] - before["connections"] == 1
    assert after["requests"] - before["requests"] == 3
    assert after["by_class"].get("2xx", 0) - before["by_class"].get("2xx", 0) == 3
    # Three requests on one client connection: at most one new upstream connection.
    assert after["pool"]["connects"] - before["pool"]["connects"] <= 1
    assert after["pool"]["reuses"] - before["pool"]["reuses"] >= 2


@pytest.mark.parametrize("dst,node", [("pod1-2", "node1"), ("pod2-1", "node2")],
                         ids=["same-node", "cross-node"])
def test_l4_transfer_still_works_with_l7_on(mesh, dst, node):
    before = http_stats(mesh, node)
    r = transfer(mesh, "pod1-1", ip_of(mesh, dst), up=2 << 20, down=3 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"] == gateway(mesh, node)
    assert http_stats(mesh, node)["connections"] == before["connections"]  # stayed on L4
