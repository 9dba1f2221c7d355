"""The same-node splice leaves other nodes' traffic alone: sock_ops files
every pod socket of a proxied connection in the splice SOCKHASH (it cannot
know where the connection goes), and the proxy takes the client pod's socket
out again as soon as it has routed the connection to another node, and the
server pod's socket of a tunnel stream as soon as its upstream connect
returns.  Out of the map, the socket's sends take the plain TCP path: the
sk_msg program no longer runs for them (it would count them as passed to
the proxy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.privileged import require_privileged, running_mesh
from tests.support.splicepeer import held, release

require_privileged()

from agent.config import ProxyConfig  # noqa: E402
from agent.datapath import abi  # noqa: E402
from agent.datapath.splicemap import SpliceMaps  # noqa: E402
from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = [sys.executable, os.path.join(HERE, "..", "support", "splicepeer.py")]
PEER_PORT = 7100
OUTBOUND_PORT = ProxyConfig.__dataclass_fields__["outbound_port"].default  # the sim keeps the default


def test_a_cross_node_client_socket_leaves_the_splice_map_once_routed(tmp_path):
    server = PEER + ["serve", "--port", str(PEER_PORT), "--log", str(tmp_path / "echo.log")]
    # proxy.splice left at the sim's default (auto): on, on this kernel
    with running_mesh(Cluster(nodes=2, pods_per_node=1), pod_servers=(("pod2-1",), server),
                      max_seconds=300) as mesh:
        up, early = 2 * 1000 * 1000 + 5, 1001
        client = mesh.cluster.pod("pod1-1").popen(
            PEER + ["bulk", mesh.cluster.pod("pod2-1").ip4, str(PEER_PORT), "--up", str(up), "--down", "7",
                    "--after", "3", "--early", str(early), "--hold"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with held(client):
            addrs = json.loads(client.stdout.readline())
            key = abi.MlFlowKey()
            key.family, saddr = abi.pack_addr(addrs["local"][0])
            _, daddr = abi.pack_addr(mesh.cluster.nodes[0].gateway4)
            key.saddr_be[:], key.daddr_be[:] = saddr, daddr
            key.sport, key.dport = addrs["local"][1], OUTBOUND_PORT
            counts = SpliceMaps(mesh.agents["node1"].pin_dir).counts(bytes(key))
            # sock_ops filed it (its count exists) and the sk_msg program saw
            # at most what the client sent before the proxy had routed it (the
            # hello and the early bytes, in one send, before the server's
            # "ready" came back through the tunnel; none of it when the proxy
            # was quicker): the other ~2 MB were sent after, outside the map.
            # Never redirected.
            hello = len(json.dumps({"mode": "bulk", "down": 7, "after": 3})) + 1
            assert counts in ((0, 0), (hello + early, 0)), counts
            res = release(client)
        assert res["ok"], res


def test_the_server_pods_socket_of_a_tunnel_stream_leaves_the_splice_map_before_a_byte(tmp_path):
    """The destination proxy's upstream connection to the pod carries a
    tunnel stream: never spliced.  sock_ops filed the pod's accepted socket
    (or was about to); the proxy takes it out once connected, before it
    forwards the first byte, so none of the pod's sends (the "ready" line
    and 2 MB) runs the sk_msg program.  Before, they all did, counted as
    passed, for the connection's whole life."""
    accepted = tmp_path / "accepted.jsonl"
    server = PEER + ["serve", "--port", str(PEER_PORT), "--accepted", str(accepted)]
    with running_mesh(Cluster(nodes=2, pods_per_node=1), pod_servers=(("pod2-1",), server),
                      max_seconds=300) as mesh:
        down = 2 * 1000 * 1000
        client = mesh.cluster.pod("pod1-1").popen(
            PEER + ["bulk", mesh.cluster.pod("pod2-1").ip4, str(PEER_PORT), "--up", "1000",
                    "--down", str(down), "--after", "3", "--hold"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with held(client):
            json.loads(client.stdout.readline())  # connected, its bytes sent; the server is sending
            addrs = json.loads(accepted.read_text().splitlines()[-1])
            key = abi.MlFlowKey()  # the pod's accepted socket, as splice.c files it
            key.family, saddr = abi.pack_addr(addrs["local"][0])
            _, daddr = abi.pack_addr(addrs["peer"][0])
            key.saddr_be[:], key.daddr_be[:] = saddr, daddr
            key.sport, key.dport = addrs["local"][1], addrs["peer"][1]
            # None: never filed; (0, 0): filed, then taken out before it sent anything
            assert SpliceMaps(mesh.agents["node2"].pin_dir).counts(bytes(key)) in (None, (0, 0))
            res = release(client)
        assert res["ok"], res
