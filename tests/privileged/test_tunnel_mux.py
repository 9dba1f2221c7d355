"""The pooled, multiplexed tunnel between node proxies (meshlet-mux/1, issue
#13 item 2), end to end on a real kernel with real processes.

What is proven here: many concurrent cross-node pod connections ride one
TLS connection (one handshake, counted against the streams); a stream whose
destination reads nothing does not hold up another stream of the same
connection; bulk both ways arrives intact; half-close and a pod's reset
cross the tunnel; a stream that claims another identity than its TLS
connection's is refused with today's deny reason; and a node forced to the
old one-connection-per-stream mode (``proxy.tunnelMux: false``) still talks
to a node that prefers the multiplexed one, both ways.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.podservers import repo_env
from tests.support.privileged import TOOLS, require_privileged, running_mesh, wait_for

require_privileged()

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

SERVE, GATED, RESETS = 7000, 7002, 7003
PEER = [sys.executable, "-m", "tests.support.muxpeer"]


def spiffe(pod: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{pod}"


def stats(mesh, node) -> dict:
    return mesh.status(node)["proxy"][0]["stats"] or {}


def counters(mesh, node) -> dict:
    return stats(mesh, node).get("counters") or {}


def handshakes(mesh, node) -> int:
    return int((stats(mesh, node).get("tls") or {}).get("handshakes", 0))


def run_json(mesh, pod, argv, timeout=90) -> dict:
    r = mesh.cluster.pod(pod).run(argv, check=False, timeout=timeout, env=repo_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def transfer(mesh, src, dst, port=SERVE, up=1 << 20, down=1 << 20) -> dict:
    return run_json(mesh, src, TOOLS + ["transfer", mesh.cluster.pod(dst).ip4, str(port),
                                        "--up", str(up), "--down", str(down)])


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mux") / "open")


@pytest.fixture(scope="module")
def mesh(gate_file):
    cluster = Cluster(nodes=2, pods_per_node=2)
    with running_mesh(cluster, servers=(("serve", SERVE),)) as m:
        for argv in (PEER + ["gate", str(GATED), "--gate", gate_file], PEER + ["rst", str(RESETS)]):
            p = cluster.pod("pod2-1").popen(argv, stdout=subprocess.PIPE, text=True, env=repo_env())
            assert "listening" in p.stdout.readline(), argv
        yield m


def test_many_concurrent_streams_ride_one_tls_connection(mesh):
    c1, c2, hs2 = counters(mesh, "node1"), counters(mesh, "node2"), handshakes(mesh, "node2")
    n = 40
    r = run_json(mesh, "pod1-2", PEER + ["many", mesh.cluster.pod("pod2-2").ip4, str(SERVE),
                                         "--count", str(n)])
    assert r == {"count": n, "ok": n}
    d1, d2 = counters(mesh, "node1"), counters(mesh, "node2")
    # one (source identity, destination identity, node): one connection, one handshake, n streams
    assert d1["tunnel_connections_out"] - c1["tunnel_connections_out"] == 1
    assert d1["tunnel_streams_out"] - c1["tunnel_streams_out"] == n
    assert d2["tunnel_connections_in"] - c2["tunnel_connections_in"] == 1
    assert d2["tunnel_streams_in"] - c2["tunnel_streams_in"] == n
    assert handshakes(mesh, "node2") - hs2 == 1
    wait_for(lambda: len([e for e in mesh.access_log("node2") if e.get("direction") == "inbound"
                          and e.get("src_identity") == spiffe("pod1-2")]) >= n,
             "an inbound access-log line per stream")
    lines = [e for e in mesh.access_log("node2")
             if e.get("direction") == "inbound" and e.get("src_identity") == spiffe("pod1-2")]
    assert all(e["peer_verified"] and e["connection_security_policy"] == "mutual_tls"
               and e["result"] == "ok" for e in lines)
    # the pooled connection stays for the next connections of that pair: no new handshake
    assert transfer(mesh, "pod1-2", "pod2-2")["ok"]
    assert handshakes(mesh, "node2") - hs2 == 1
    assert stats(mesh, "node1")["tunnel_mux"]["out"]["connections"] >= 1


def test_a_stalled_bulk_stream_does_not_starve_a_request_stream(mesh, gate_file):
    """Same pods, same identities, so the same pooled connection: the bulk
    stream's destination reads nothing until the request stream is done."""
    dst = mesh.cluster.pod("pod2-1").ip4
    base = counters(mesh, "node1")["tunnel_connections_out"]
    bulk = mesh.cluster.pod("pod1-1").popen(
        TOOLS + ["transfer", dst, str(GATED), "--up", str(16 << 20), "--down", str(4 << 20),
                 "--timeout", "60"],
        stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: counters(mesh, "node1")["tunnel_streams_out"] > 0
                 and stats(mesh, "node1")["tunnel_mux"]["out"]["streams"] >= 1, "the bulk stream to open")
        r = transfer(mesh, "pod1-1", "pod2-1", up=4096, down=4096)
        assert r["ok"], r
        assert bulk.poll() is None, "the bulk transfer ended before its destination read anything"
        assert counters(mesh, "node1")["tunnel_connections_out"] - base == 1  # both on one connection
    finally:
        open(gate_file, "w").close()
    out, _ = bulk.communicate(timeout=90)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"], res  # 16 MiB up and 4 MiB down, checksummed, after the window filled


def test_checksummed_bulk_both_ways_and_half_close(mesh):
    # transfer: the client half-closes after its upload; the server answers after EOF
    r = transfer(mesh, "pod2-2", "pod1-2", up=24 << 20, down=24 << 20)
    assert r["ok"], r
    r = transfer(mesh, "pod1-1", "pod2-2", up=0, down=3 << 20)
    assert r["ok"], r


def test_a_pod_reset_crosses_the_tunnel_as_a_reset(mesh):
    r = run_json(mesh, "pod1-2", PEER + ["expect-reset", mesh.cluster.pod("pod2-1").ip4, str(RESETS)])
    assert r == {"outcome": "RESET"}
    # and the connection the reset stream rode on still carries others
    assert transfer(mesh, "pod1-2", "pod2-1", up=4096, down=4096)["ok"]


# A hand-made meshlet-mux/1 client on node1: a certificate for pod1-1 minted
# with node1's intermediate, one TLS connection, two streams: one whose header
# claims pod1-2 (not the identity the connection proved), one honest.
FORGE = r"""
import json, socket, ssl, sys
from datetime import timedelta
from cryptography.hazmat.primitives import serialization
from agent.identity import svid as c
from agent.identity.spiffe import parse_spiffe_id
from agent.proxy import mux, tunnel
from agent.proxy.tls import sni_for

ca_dir, target, identity, claim, dst_identity, dst_ip, dst_port, src_ip, tmp = sys.argv[1:10]
inter = c.load_certs_pem(open(f"{ca_dir}/ca.pem", "rb").read())[0]
inter_key = serialization.load_pem_private_key(open(f"{ca_dir}/ca-key.pem", "rb").read(), None)
key = c.generate_key()
sid = parse_spiffe_id(identity)
leaf = c.sign_workload_csr(c.make_csr(sid, key), expected=sid, issuer_cert=inter, issuer_key=inter_key,
                           ttl=timedelta(minutes=10))
open(f"{tmp}/chain.pem", "wb").write(c.cert_to_pem(leaf) + c.cert_to_pem(inter))
open(f"{tmp}/key.pem", "wb").write(c.key_to_pem(key))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols([mux.ALPN])
ctx.load_cert_chain(f"{tmp}/chain.pem", f"{tmp}/key.pem")
raw = socket.create_connection((target, 15008), timeout=10)
t = ctx.wrap_socket(raw, server_hostname=sni_for(dst_identity))
t.settimeout(10)
conn = mux.MuxConnection(client=True)
def header(who):
    return tunnel.encode_request(tunnel.TunnelRequest(
        dst=tunnel.Address(socket.AF_INET, dst_ip, int(dst_port)), identity=who,
        namespace="default", name=who.rsplit("/", 1)[1], src=tunnel.Address(socket.AF_INET, src_ip, 40000)))
streams = {conn.open_stream(header(claim)): "forged", conn.open_stream(header(identity)): "honest"}
t.sendall(conn.data_to_send())
got = {k: b"" for k in streams}
res = {"alpn": t.selected_alpn_protocol()}
while len(res) < 3:
    data = t.recv(65536)
    if not data:
        break
    for ev in conn.receive(data):
        if isinstance(ev, mux.DataReceived):
            got[ev.stream_id] += ev.data
            out = tunnel.ResponseDecoder().feed(got[ev.stream_id])
            if out is not tunnel.NEED_MORE and streams[ev.stream_id] not in res:
                res[streams[ev.stream_id]] = out.message.status.name
        elif isinstance(ev, mux.StreamReset) and streams[ev.stream_id] not in res:
            res[streams[ev.stream_id]] = "RESET"
    t.sendall(conn.data_to_send())
print(json.dumps(res))
"""


def test_a_stream_claiming_another_identity_is_refused(mesh, tmp_path):
    """The header's identity must be the one verified on the TLS connection the
    stream arrived on: refused with the per-connection path's deny reason, and
    the honest stream beside it on the same connection is served."""
    r = mesh.cluster.node("node1").run(
        [sys.executable, "-c", FORGE, mesh.identity_dir("node1"), mesh.cluster.node("node2").address,
         spiffe("pod1-1"), spiffe("pod1-2"), spiffe("pod2-1"), mesh.cluster.pod("pod2-1").ip4, str(SERVE),
         mesh.cluster.pod("pod1-1").ip4, str(tmp_path)],
        check=False, timeout=60, env=repo_env())
    assert r.stdout.strip(), r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"alpn": "meshlet-mux/1", "forged": "FORBIDDEN", "honest": "OK"}, res
    wait_for(lambda: any(e.get("deny_reason") == "identity_mismatch"
                         and e.get("src_identity") == spiffe("pod1-1") for e in mesh.access_log("node2")),
             "the refusal in node2's access log")


@pytest.fixture(scope="module")
def mixed():
    """node2 forced to the old one-connection-per-stream mode (proxy.tunnelMux: false)."""
    with running_mesh(Cluster(nodes=2, pods_per_node=1), servers=(("serve", SERVE),),
                      legacy_tunnel_nodes={"node2"}) as m:
        yield m


def test_a_node_that_only_speaks_the_old_tunnel_still_works_both_ways(mixed):
    for src, dst in (("pod1-1", "pod2-1"), ("pod2-1", "pod1-1")):
        for _ in range(2):
            r = transfer(mixed, src, dst, up=256 << 10, down=256 << 10)
            assert r["ok"], (src, dst, r)
    c1, c2 = counters(mixed, "node1"), counters(mixed, "node2")
    assert c1["tunnel_connections_out"] == 0 and c1["tunnel_connections_in"] == 0
    assert c1["tunnel_legacy"] >= 1  # node1 offered meshlet-mux/1, node2 answered meshlet-tunnel/1
    assert c2["tunnel_connections_out"] == 0 and c2["tunnel_streams_out"] == 0
    assert handshakes(mixed, "node2") >= 2 and handshakes(mixed, "node1") >= 2  # one per connection
    lines = [e for e in mixed.access_log("node2") if e.get("direction") == "inbound"]
    assert len(lines) >= 2 and all(e["result"] == "ok" and e["peer_verified"] for e in lines)
