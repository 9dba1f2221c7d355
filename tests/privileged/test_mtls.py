"""Mutual TLS between node proxies, end to end on a real kernel (issue #3).

A 2-node cluster (pod1-1, pod1-2 on node1; pod2-1, pod2-2 on node2), a mesh
CA made by ``meshlet ca``'s code, one agent per node.  What is proven here:
the inter-node link carries TLS and never the payload; the inbound proxy
sees the verified source SPIFFE ID; forged or invalid certificates are
refused at the handshake with a reason and a counter; a node will not sign
another node's identities; leaf rotation and CA rotation under steady
traffic cause no connection errors.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.privileged import TOOLS, require_privileged, running_mesh, start_servers, wait_for

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged

MARKER = "MESHLET-PLAINTEXT-MARKER-7d1f"


@pytest.fixture(scope="module")
def mesh():
    with running_mesh(Cluster(nodes=2, pods_per_node=2), servers=(("serve", 7000), ("echo", 7001))) as m:
        yield m


def transfer(mesh, src, dst, up=1 << 20, down=1 << 20):
    r = mesh.cluster.pod(src).run(TOOLS + ["transfer", mesh.cluster.pod(dst).ip4, "7000",
                                           "--up", str(up), "--down", str(down)],
                                  check=False, timeout=60)
    return json.loads(r.stdout.strip().splitlines()[-1])




def proxy_stats(mesh, node):
    return mesh.status(node)["proxy"][0]["stats"] or {}


def held_certs(mesh, node) -> dict[str, dict]:
    certs = proxy_stats(mesh, node).get("certs") or {}
    return {c["spiffe_id"]: c for c in certs.get("identities", [])}


def spiffe(pod: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{pod}"


# --- the wire ----------------------------------------------------------------------

ECHO_MARKER = f"""
import socket, sys
s = socket.create_connection((sys.argv[1], 7001), timeout=10)
msg = ({MARKER!r} + "\\n").encode() * 200
s.sendall(msg)
got = b""
while len(got) < len(msg):
    b = s.recv(65536)
    if not b:
        break
    got += b
print("ECHOED" if got == msg else "MISMATCH")
"""


def test_inter_node_link_carries_tls_not_the_payload(mesh, tmp_path):
    node1 = mesh.cluster.node("node1")
    pcap = tmp_path / "link.pcap"
    dump = node1.popen(["tcpdump", "-i", "eth0", "-U", "-n", "-s", "0", "-w", str(pcap),
                        "tcp", "port", "15008"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pcap.exists(), "tcpdump to start", timeout=10)
        time.sleep(0.5)
        r = mesh.cluster.pod("pod1-1").run([sys.executable, "-c", ECHO_MARKER,
                                            mesh.cluster.pod("pod2-1").ip4], timeout=30)
        assert r.stdout.strip() == "ECHOED", r.stdout + r.stderr
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    data = pcap.read_bytes()
    assert len(data) > 2000, "the capture saw no tunnel traffic"
    assert b"\x16\x03\x01" in data or b"\x16\x03\x03" in data      # TLS handshake records
    assert data.count(b"\x17\x03\x03") >= 2                         # TLS application data
    assert MARKER.encode() not in data
    # and the tunnel header (it names the destination pod) is inside TLS too
    assert b"MLTN" not in data


def test_inbound_proxy_sees_the_verified_source_identity(mesh):
    r = transfer(mesh, "pod1-2", "pod2-2")
    assert r["ok"], r
    entries = [e for e in mesh.access_log("node2")
               if e.get("direction") == "inbound" and e.get("src_identity") == spiffe("pod1-2")]
    assert entries, mesh.access_log("node2")
    assert all(e.get("peer_verified") is True for e in entries)


def test_same_node_traffic_carries_both_identities(mesh):
    r = transfer(mesh, "pod1-1", "pod1-2")
    assert r["ok"], r
    entries = [e for e in mesh.access_log("node1")
               if e.get("route") == "local" and e.get("src_identity") == spiffe("pod1-1")]
    assert entries and entries[-1].get("dst_identity") == spiffe("pod1-2"), entries


def test_proxy_holds_certificates_for_its_own_pods_only(mesh):
    held = held_certs(mesh, "node1")
    assert set(held) == {spiffe("pod1-1"), spiffe("pod1-2")}, held
    for c in held.values():
        assert c.get("not_after") and c.get("next_rotation")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "certs", "--socket",
                        os.path.join(mesh.agents["node1"].run_dir, "admin.sock"), "-o", "json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["identity"]["trust_domain"] == "cluster.local"
    assert {c["spiffe_id"] for c in out["proxy"][0]["identities"]} == set(held)


# --- refusals ------------------------------------------------------------------------

def ca_request(mesh, node, req: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(mesh.agents[node].run_dir, "ca.sock"))
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


def test_node_will_not_sign_another_nodes_identity(mesh):
    from agent.identity.svid import generate_key, make_csr
    from agent.identity.spiffe import parse_spiffe_id

    key = generate_key()
    foreign = spiffe("pod2-1")
    resp = ca_request(mesh, "node1", {"op": "sign", "identity": foreign,
                                      "csr": make_csr(parse_spiffe_id(foreign), key).decode()})
    assert resp["ok"] is False and resp["reason"] == "not_on_node", resp
    own = spiffe("pod1-1")
    resp = ca_request(mesh, "node1", {"op": "sign", "identity": own,
                                      "csr": make_csr(parse_spiffe_id(own), key).decode()})
    assert resp["ok"] is True and "BEGIN CERTIFICATE" in resp["chain"]
    # a CSR for one identity presented as another is refused too
    resp = ca_request(mesh, "node1", {"op": "sign", "identity": own,
                                      "csr": make_csr(parse_spiffe_id(spiffe("pod1-2")),
                                                      key).decode()})
    assert resp["ok"] is False, resp
    counters = mesh.status("node1")["identity"]["issuer_counters"]
    assert counters.get("refused_not_on_node", 0) >= 1
    assert "refused certificate request: not_on_node" in mesh.agent_log("node1")


FORGED_CLIENT = """
import json, socket, ssl, sys
chain_pem, key_pem, target = sys.argv[1:4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["meshlet-tunnel/1"])
ctx.load_cert_chain(chain_pem, key_pem)
s = socket.create_connection((target, 15008), timeout=5)
try:
    t = ctx.wrap_socket(s, server_hostname=None)
    t.settimeout(5)
    t.sendall(b"x")
    data = t.recv(100)
    print(json.dumps({"result": "data" if data else "eof"}))
except (ssl.SSLError, ConnectionError, OSError) as e:
    print(json.dumps({"result": "refused", "error": str(e)}))
"""


def mint(mesh, tmp_path, kind: str):
    """A client certificate of the given kind, as files."""
    from datetime import datetime, timedelta, timezone

    from agent.identity import svid as c
    from tests.support.ca import CertFactory

    sid = spiffe("pod1-1")
    if kind == "unknown_ca":
        fac = CertFactory("cluster.local")
        chain, key = fac.leaf(sid)
    else:
        # signed by node1's real intermediate, inside its validity, but expired
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        d = mesh.identity_dir("node1")
        with open(os.path.join(d, "ca.pem"), "rb") as f:
            ca_chain = c.load_certs_pem(f.read())
        with open(os.path.join(d, "ca-key.pem"), "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        key = c.generate_key()
        start = ca_chain[0].not_valid_before_utc
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(ca_chain[0].subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(start + timedelta(seconds=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(sid)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        while datetime.now(timezone.utc) < start + timedelta(seconds=2):
            time.sleep(0.2)
        chain = [leaf] + ca_chain
    cp, kp = tmp_path / f"{kind}.pem", tmp_path / f"{kind}-key.pem"
    cp.write_bytes(b"".join(c.cert_to_pem(x) for x in chain))
    kp.write_bytes(c.key_to_pem(key))
    return str(cp), str(kp)


@pytest.mark.parametrize("kind", ["unknown_ca", "expired"])
def test_invalid_client_certificates_are_refused_at_the_handshake(mesh, tmp_path, kind):
    cp, kp = mint(mesh, tmp_path, kind)
    before = json.dumps(proxy_stats(mesh, "node2"))
    node1 = mesh.cluster.node("node1")   # a mesh node address: passes the address check
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = node1.run([sys.executable, "-c", FORGED_CLIENT, cp, kp,
                   mesh.cluster.node("node2").address], check=False, timeout=30, cwd=repo)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["result"] in ("refused", "eof"), res
    stats = wait_for(lambda: (s := proxy_stats(mesh, "node2")) and json.dumps(s) != before and s,
                     "the refusal to be counted")
    assert kind in json.dumps(stats.get("tls", stats)), stats
    assert kind in mesh.proxy_log("node2")


# --- rotation --------------------------------------------------------------------------

class Traffic(threading.Thread):
    """Steady cross-node and same-node transfers in a bounded loop."""

    def __init__(self, mesh, seconds: float, pairs):
        super().__init__(daemon=True)
        self.mesh, self.deadline, self.pairs = mesh, time.monotonic() + seconds, pairs
        self.ok = 0
        self.errors: list = []
        self.stop = threading.Event()

    def run(self):
        i = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline and i < 2000:
            src, dst = self.pairs[i % len(self.pairs)]
            i += 1
            try:
                r = transfer(self.mesh, src, dst, up=64 << 10, down=64 << 10)
            except Exception as e:  # noqa: BLE001
                r = {"ok": False, "error": repr(e)}
            if r.get("ok"):
                self.ok += 1
            else:
                self.errors.append((src, dst, r))


@pytest.fixture(scope="module")
def short_lived():
    """A second cluster whose workload certificates live 20 s (renewed ~10 s)."""
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    m = Mesh(cluster, cert_ttl=20)
    try:
        start_servers(cluster)
        m.start()
        yield m
    finally:
        m.down()
        cluster.down()


PAIRS = [("pod1-1", "pod2-1"), ("pod2-2", "pod1-2"), ("pod1-2", "pod1-1")]


def test_leaf_rotation_under_steady_traffic(short_lived):
    m = short_lived
    first = {k: v["serial"] for k, v in held_certs(m, "node1").items()}
    assert first
    session = m.cluster.pod("pod1-1").popen(
        TOOLS + ["session", m.cluster.pod("pod2-1").ip4, "7001"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    traffic = Traffic(m, seconds=40, pairs=PAIRS)
    try:
        assert "connected" in session.stdout.readline()
        dialed = proxy_stats(m, "node1")["counters"]["tunnel_connections_out"]
        traffic.start()
        wait_for(lambda: all(held_certs(m, "node1").get(k, {}).get("serial") not in (None, s)
                             for k, s in first.items()), "every leaf to rotate", timeout=40)
        # the pooled tunnel: a rotated source certificate means new streams on a new connection
        # (with the new certificate), while the session's stream, opened before, goes on on the old one
        wait_for(lambda: proxy_stats(m, "node1")["counters"]["tunnel_connections_out"] > dialed,
                 "a new tunnel connection after the rotation", timeout=20)
        session.stdin.write("after-rotation\n")
        session.stdin.flush()
        assert json.loads(session.stdout.readline()) == {"echo": "after-rotation"}
        assert proxy_stats(m, "node1")["counters"]["tunnel_mux_errors"] == 0
    finally:
        traffic.stop.set()
        traffic.join(timeout=60)
        session.kill()
        session.wait()
    assert traffic.ok >= 5
    assert traffic.errors == []


def test_ca_rotation_with_overlap_across_nodes(short_lived):
    from agent.identity import ca

    m = short_lived
    traffic = Traffic(m, seconds=120, pairs=PAIRS)
    traffic.start()

    def node_ca_serial(node):
        return m.status(node)["identity"]["node_ca"]["serial"]

    def roots(node):
        return len(m.status(node)["identity"]["roots"])

    try:
        ca.rotate_root(m.ca_dir)
        # 1. the new bundle (old + new roots) reaches node1, later node2
        m.distribute_ca(["node1"], node_ca=False)
        wait_for(lambda: roots("node1") == 2, "node1 to trust both roots")
        time.sleep(2)
        m.distribute_ca(["node2"], node_ca=False)
        wait_for(lambda: roots("node2") == 2, "node2 to trust both roots")
        # 2. node1 gets an intermediate from the new root; node2 keeps the old one
        before1 = node_ca_serial("node1")
        ca.reissue_node(m.ca_dir, "node1")
        m.distribute_ca(["node1"], bundle=False)
        wait_for(lambda: node_ca_serial("node1") != before1, "node1's new intermediate")
        time.sleep(4)   # traffic between a new-root node and an old-root node
        before2 = node_ca_serial("node2")
        ca.reissue_node(m.ca_dir, "node2")
        m.distribute_ca(["node2"], bundle=False)
        wait_for(lambda: node_ca_serial("node2") != before2, "node2's new intermediate")
        time.sleep(4)
        # 3. end of the overlap: the old root leaves every bundle
        with open(os.path.join(m.ca_dir, "ca.json")) as f:
            meta = json.load(f)
        old = [r["serial"] for r in meta["roots"]
               if r["serial"] != meta["current_root"] and r["in_bundle"]]
        assert len(old) == 1, meta
        ca.retire_root(m.ca_dir, old[0])
        m.distribute_ca(node_ca=False)
        wait_for(lambda: roots("node1") == 1 and roots("node2") == 1, "old root retired")
        time.sleep(4)
    finally:
        traffic.stop.set()
        traffic.join(timeout=60)
    assert traffic.ok >= 10
    assert traffic.errors == []
