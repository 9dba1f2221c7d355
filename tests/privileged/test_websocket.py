"""WebSocket through the L7 path with a real client and server (the
``websockets`` library), same-node and cross-node (mTLS), on a real 2-node
simulated cluster with ``proxy.l7: true``: the upgrade request is parsed and
logged as a request (status 101), then the connection carries WebSocket
frames both ways until the client closes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.privileged import require_privileged, wait_for

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SERVER = """
import sys
from websockets.sync.server import serve

def echo(ws):
    for message in ws:
        ws.send(f"{ws.request.path} echo: {message}")

with serve(echo, "0.0.0.0", 7100) as server:
    print("listening", flush=True)
    server.serve_forever()
"""

CLIENT = """
import json, sys
from websockets.sync.client import connect

out = []
with connect(sys.argv[1], open_timeout=10, close_timeout=5) as ws:
    for i in range(5):
        ws.send(f"hello {i}")
        out.append(ws.recv(timeout=10))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh():
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    m = Mesh(cluster, l7=True)
    procs = []
    try:
        m.start()
        for name in ("pod1-2", "pod2-1"):
            p = cluster.pod(name).popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True,
                                        cwd=ROOT)
            procs.append(p)
            assert "listening" in p.stdout.readline()
        yield m
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        m.down()
        cluster.down()


@pytest.mark.parametrize("dst,node", [("pod1-2", "node1"), ("pod2-1", "node2")], ids=["same-node", "cross-node"])
def test_websocket_echo_through_the_l7_session(mesh, dst, node):
    ip = mesh.cluster.pod(dst).ip4
    r = mesh.cluster.pod("pod1-1").run([sys.executable, "-c", CLIENT, f"ws://{ip}:7100/chat"],
                                       check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == [f"/chat echo: hello {i}" for i in range(5)]

    def upgraded():  # the destination proxy parsed the handshake: a request line with 101
        return [e for e in mesh.access_log(node) if e.get("kind") == "request"
                and e.get("status") == 101 and e.get("dst_pod") == f"default/{dst}"]

    lines = wait_for(upgraded, "the upgrade request in the destination proxy's access log", timeout=10)
    assert lines[-1]["method"] == "GET" and lines[-1]["path"] == "/chat"
