"""Security gaps found probing as an attacker would (issue #12 items 8 and 10),
end to end on a real kernel: a 2-node cluster (pod1-1, pod1-2 on node1;
pod2-1, pod2-2 on node2), the mesh CA made by ``meshlet ca``'s code, one
agent per node.

Key scope: the attacker holds node1's intermediate key (a compromised node)
and mints workload certificates with it.  Node2 must refuse them for any
identity that has no pod on node1, node1's certificates coming from
another node's address, and a tunnel header naming a source address that
is not node1's pod's (what ipBlocks rules match); each refusal is answered with a reason
and counted (``key_scope``).  A certificate node1 could legitimately issue
(for its own pod) still works through the same hand-made client, so the
refusals are not the client's fault.

Information on disk: what the agent and the proxies write in the run dir
is 0600 (state, policies) or 0640 (logs).
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from tests.support.privileged import (
    policy_cli, require_privileged, running_mesh, transfer, wait_for,
)

require_privileged()

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def mesh():
    with running_mesh(Cluster(nodes=2, pods_per_node=2), servers=(("serve", 7000), ("echo", 7001))) as m:
        yield m


def spiffe(pod: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{pod}"


# A compromised node's proxy, by hand: mint a workload certificate with the
# node's intermediate key, open the mesh tunnel to another node over mTLS
# (SNI naming the destination pod's identity), send the tunnel header and
# report the tunnel response (and, when admitted, the echo of a line).
ATTACKER = r"""
import json, socket, ssl, sys
from datetime import timedelta
from cryptography.hazmat.primitives import serialization
from agent.identity import svid as c
from agent.identity.spiffe import parse_spiffe_id
from agent.proxy import tunnel
from agent.proxy.tls import ALPN, sni_for

ca_dir, target, identity, dst_identity, dst_ip, dst_port, tmp, src_ip = sys.argv[1:9]
with open(f"{ca_dir}/ca.pem", "rb") as f:
    inter = c.load_certs_pem(f.read())[0]
with open(f"{ca_dir}/ca-key.pem", "rb") as f:
    inter_key = serialization.load_pem_private_key(f.read(), None)
key = c.generate_key()
sid = parse_spiffe_id(identity)
leaf = c.sign_workload_csr(c.make_csr(sid, key), expected=sid, issuer_cert=inter, issuer_key=inter_key,
                           ttl=timedelta(minutes=10))
with open(f"{tmp}/chain.pem", "wb") as f:
    f.write(c.cert_to_pem(leaf) + c.cert_to_pem(inter))
with open(f"{tmp}/key.pem", "wb") as f:
    f.write(c.key_to_pem(key))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols([ALPN])
ctx.load_cert_chain(f"{tmp}/chain.pem", f"{tmp}/key.pem")
s = socket.create_connection((target, 15008), timeout=10)
t = ctx.wrap_socket(s, server_hostname=sni_for(dst_identity))
t.settimeout(10)
line = b"MESHLET-KEY-SCOPE-PROBE\n"
t.sendall(tunnel.encode_request(tunnel.TunnelRequest(
    dst=tunnel.Address(socket.AF_INET, dst_ip, int(dst_port)), identity=identity,
    namespace="default", name=identity.rsplit("/", 1)[1],
    src=tunnel.Address(socket.AF_INET, src_ip, 40000))) + line)
dec, out, rest = tunnel.ResponseDecoder(), tunnel.NEED_MORE, b""
while out is tunnel.NEED_MORE:
    chunk = t.recv(65536)
    if not chunk:
        break
    out = dec.feed(chunk)
res = {"status": None}
if out is not tunnel.NEED_MORE:
    res = {"status": out.message.status.name, "reason": out.message.reason}
    rest = out.leftover
    if out.message.status is tunnel.Status.OK:
        while len(rest) < len(line):
            chunk = t.recv(65536)
            if not chunk:
                break
            rest += chunk
        res["echoed"] = rest[:len(line)] == line
print(json.dumps(res))
"""


def denied(mesh, node: str) -> dict[str, int]:
    """Deny counters summed over the node's proxy workers."""
    out: dict[str, int] = {}
    for w in mesh.status(node)["proxy"]:
        for k, v in ((w.get("stats") or {}).get("metrics") or {}).get("denied", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def attack(mesh, tmp_path, *, from_node: str, to_node: str, issuer_node: str, identity: str,
           dst_pod: str, src_pod: str) -> dict:
    """The tunnel header names ``src_pod``'s address as the source (what ipBlocks match)."""
    d = tmp_path / f"{from_node}-{identity.rsplit('/', 1)[1]}-{issuer_node}-{src_pod}"
    d.mkdir()
    r = mesh.cluster.node(from_node).run(
        [sys.executable, "-c", ATTACKER, mesh.identity_dir(issuer_node), mesh.cluster.node(to_node).address,
         identity, spiffe(dst_pod), mesh.cluster.pod(dst_pod).ip4, "7001", str(d),
         mesh.cluster.pod(src_pod).ip4],
        check=False, timeout=60, cwd=REPO)
    assert r.stdout.strip(), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# (case, attacker's node, target node, whose key, identity claimed, source pod in the header,
#  destination pod, the reason's words)
ATTACKS = [
    ("node1's key for node2's identity", "node1", "node2", "node1", "pod2-1", "pod2-1", "pod2-2",
     f"node node1 has no mesh pod with identity {spiffe('pod2-1')}"),
    ("node1's key for an identity no pod has", "node1", "node2", "node1", "nobody", "pod1-1", "pod2-2",
     f"node node1 has no mesh pod with identity {spiffe('nobody')}"),
    ("node1's key for its own pod, used from node2", "node2", "node1", "node1", "pod1-1", "pod1-1", "pod1-2",
     "issued by node node1's intermediate CA, but the connection comes from node node2"),
    ("node1's own pod claiming node2's pod's address", "node1", "node2", "node1", "pod1-1", "pod2-1",
     "pod2-2", "is no address of a mesh pod of node node1"),
]


@pytest.mark.parametrize("case,src,dst,key,who,src_pod,pod,why", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_compromised_node_cannot_speak_for_other_nodes_pods(mesh, tmp_path, case, src, dst, key, who,
                                                              src_pod, pod, why):
    before = denied(mesh, dst).get("key_scope", 0)
    res = attack(mesh, tmp_path, from_node=src, to_node=dst, issuer_node=key, identity=spiffe(who),
                 dst_pod=pod, src_pod=src_pod)
    assert res["status"] == "FORBIDDEN", res
    assert res["reason"].startswith("key scope: ") and why in res["reason"], res
    wait_for(lambda: denied(mesh, dst).get("key_scope", 0) == before + 1, "the refusal to be counted")
    entries = [e for e in mesh.access_log(dst)
               if e.get("direction") == "inbound" and e.get("src_identity") == spiffe(who)]
    assert entries and entries[-1]["result"] == "rejected" and "key scope" in entries[-1]["reason"], entries
    assert "key scope" in mesh.proxy_log(dst)


def test_the_same_hand_made_client_is_admitted_for_its_own_nodes_pod(mesh, tmp_path):
    """The control: node1's key, for node1's own pod, from node1: admitted and relayed."""
    before = denied(mesh, "node2").get("key_scope", 0)
    res = attack(mesh, tmp_path, from_node="node1", to_node="node2", issuer_node="node1",
                 identity=spiffe("pod1-1"), dst_pod="pod2-2", src_pod="pod1-1")
    assert res["status"] == "OK" and res["echoed"] is True, res
    assert denied(mesh, "node2").get("key_scope", 0) == before


def test_mesh_traffic_still_flows_both_ways(mesh):
    for src, dst in (("pod1-1", "pod2-1"), ("pod2-2", "pod1-2")):
        r = transfer(mesh, src, mesh.cluster.pod(dst).ip4, up=64 << 10, down=64 << 10)
        assert r["ok"], r


# --- information on disk (item 10) ---------------------------------------------------


def test_run_dir_files_are_private(mesh, tmp_path):
    f = tmp_path / "deny.yaml"
    f.write_text("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: elsewhere}  # selects no pod of this cluster
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
""")
    r = policy_cli(mesh, "node1", "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert transfer(mesh, "pod1-1", mesh.cluster.pod("pod2-1").ip4, up=1024, down=1024)["ok"]
    run_dir = mesh.agents["node1"].run_dir
    want = {"proxy-state.json": 0o600, "policies.json": 0o600, "policies.yaml": 0o600,
            "access.log": 0o640, "proxy-0.log": 0o640}
    wait_for(lambda: all(os.path.exists(os.path.join(run_dir, n)) for n in want), "the run dir's files")
    got = {n: stat.S_IMODE(os.stat(os.path.join(run_dir, n)).st_mode) for n in want}
    assert got == want
    # nothing in the run dir is readable by others
    others = {n: oct(stat.S_IMODE(os.stat(os.path.join(run_dir, n)).st_mode))
              for n in os.listdir(run_dir)
              if os.path.isfile(os.path.join(run_dir, n))
              and stat.S_IMODE(os.stat(os.path.join(run_dir, n)).st_mode) & 0o007}
    assert others == {}
