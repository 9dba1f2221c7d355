"""End to end in Kubernetes mode with intermediates by CSR: a 2-node
simulated cluster whose agents start with no node CA at all, each with the
node agent's service-account token bound to its own node (permissions from
deploy/rbac.yaml's ClusterRole), and ``meshlet ca controller`` (a process,
its own token with the CA's ClusterRole) holding the only root.

Until the controller runs, the agents sign nothing and say why; then each
node gets its own intermediate, cross-node mTLS works, and the workload
certificates chain to the controller's root.  Reuses tests/support/kubemesh.py
(the pods' kubelet cgroups, the API in every node's network namespace).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from cryptography import x509

from tests.support.privileged import (
    ask_node_ca,
    gateway,
    ip_of,
    require_privileged,
    start_servers,
    transfer,
    wait_for,
)

require_privileged()

from agent.identity import csrpolicy as cp  # noqa: E402
from agent.identity.ca import init_ca  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from tests.support import kubeapi as k  # noqa: E402
from tests.support.kubemesh import KubeMesh, publish  # noqa: E402
from tests.unit.test_ca_controller import rbac_allow  # noqa: E402

pytestmark = pytest.mark.privileged

CA_USER = "system:serviceaccount:meshlet-system:meshlet-ca"


class CsrKubeMesh(KubeMesh):
    """Agents with ``identity.nodeCA: csr``, each with its own node-bound token;
    no node intermediate is placed on any node, only the root is made."""

    api: k.FakeKubeAPI | None = None

    def init_ca(self) -> None:
        if not os.path.exists(os.path.join(self.ca_dir, "bundle.pem")):
            init_ca(self.ca_dir, self.trust_domain, [])
        for n in self.cluster.nodes:
            os.makedirs(self.identity_dir(n.name), mode=0o700, exist_ok=True)

    def config_doc(self, node):
        doc = super().config_doc(node)
        assert self.api is not None
        kc = os.path.join(self.workdir, f"kubeconfig-{node.name}")
        doc["workloads"]["kubeconfig"] = self.api.kubeconfig(kc, token=f"{node.name}-token")
        doc["identity"]["nodeCA"] = "csr"
        return doc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("kubecsr"))
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    api = k.FakeKubeAPI(workdir=work, bookmark_interval=1.0)
    mesh = CsrKubeMesh(cluster, workdir=os.path.join(work, "mesh"))
    ctl = None
    try:
        publish(cluster, api)
        node_allow = rbac_allow("meshlet-node")
        for n in cluster.nodes:
            api.add_user(f"{n.name}-token", cp.NODE_USER, extra={cp.NODE_NAME_EXTRA: [n.name]},
                         groups=("system:serviceaccounts", "system:authenticated"), allow=node_allow)
        api.add_user("ca-token", CA_USER, allow=rbac_allow("meshlet-ca"))
        api.start()
        mesh.api = api
        start_servers(cluster, (("serve", 7000), ("echo", 7001)))
        # No intermediate yet, so no certificates: the workers would listen only
        # after their wait for them (30 s); the test's own waits come first.
        mesh.start(listening=False)

        def start_controller():
            nonlocal ctl
            kc = api.kubeconfig(os.path.join(work, "kubeconfig-ca"), token="ca-token")
            log = open(os.path.join(work, "controller.log"), "ab")
            ctl = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "ca", "controller", "--root", mesh.ca_dir,
                 "--kubeconfig", kc, "--metrics-port", "0", "--ttl", "48"],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            return ctl

        yield mesh, api, start_controller, work
    finally:
        if ctl is not None:
            ctl.terminate()
            try:
                ctl.wait(10)
            except subprocess.TimeoutExpired:
                ctl.kill()
                ctl.wait()
        mesh.down()
        api.stop()
        cluster.down()


def test_nodes_get_their_intermediates_by_csr_and_mesh_across_nodes(env):
    mesh, api, start_controller, work = env
    # No controller yet: every node waits, fail closed, and says why.
    for node in ("node1", "node2"):
        def waiting(n=node):
            i = mesh.status(n)["identity"]
            return (i.get("node_ca_csr") or {}).get("state") == "waiting" and i

        ident = wait_for(waiting, f"{node} waiting for its CSR")
        assert "waiting for CSR meshlet-node-" in ident["node_ca_csr"]["message"], ident
        assert "to be approved" in ident["node_ca_csr"]["message"]
        assert ident["error"].startswith("no node intermediate yet, no workload certificates"), ident
        assert "node_ca" not in ident  # nothing loaded: the node's issuer signs nothing

        def health(n=node):  # what the DaemonSet's readiness probe reads
            with open(os.path.join(mesh.agents[n].run_dir, "health.json")) as f:
                doc = json.load(f)
            return "not listening yet" in doc["why"] and doc

        # its workers wait for their certificates, not listening: the node is not ready
        doc = wait_for(health, f"{node}'s health names the workers that do not listen yet", timeout=10)
        assert doc["ready"] is False, doc
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--socket",
                          os.path.join(mesh.agents["node1"].run_dir, "admin.sock")],
                         capture_output=True, text=True, timeout=30).stdout
    assert "node CA by CSR: waiting: waiting for CSR meshlet-node-node1-" in out, out

    ctl = start_controller()
    root = x509.load_pem_x509_certificate(pathlib.Path(mesh.ca_dir, "root.pem").read_bytes())
    for node in ("node1", "node2"):
        ident = wait_for(lambda n=node: "node_ca" in (i := mesh.status(n)["identity"]) and i,
                         f"{node}'s intermediate loaded", timeout=60)
        assert f",CN={mesh.trust_domain} node {node},O=meshlet" in ident["node_ca"]["subject"], ident
        assert ident["node_ca_csr"]["state"] == "valid" and not ident["error"]
        pem = pathlib.Path(mesh.identity_dir(node), "ca.pem").read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(root)
        assert os.stat(os.path.join(mesh.identity_dir(node), "ca-key.pem")).st_mode & 0o077 == 0
    csrs = api.find("CertificateSigningRequest")
    assert len(csrs) == 2 and all((c.get("status") or {}).get("certificate") for c in csrs)
    assert ctl.poll() is None

    # cross-node traffic through the mesh, mTLS with the CSR-issued intermediates
    def through_mesh(src, dst, gw_node, v6=False):
        r = transfer(mesh, src, ip_of(mesh, dst, v6=v6), up=1 << 20, down=1 << 20)
        return r["ok"] and r["server_saw_peer"] == gateway(mesh, gw_node, v6=v6) and r

    wait_for(lambda: through_mesh("pod1-1", "pod2-1", "node2"), "node1 -> node2 through the mesh", timeout=60)
    wait_for(lambda: through_mesh("pod2-2", "pod1-2", "node1", v6=True), "node2 -> node1 through the mesh",
             timeout=60)
    certs = mesh.status("node1")["proxy"][0]["stats"]["certs"]["identities"]
    assert certs and all(c["serial"] for c in certs), certs  # the proxy holds a certificate per identity

    # The controller process signed as the holder of its Lease (leader election is on by default;
    # its token has deploy/rbac.yaml's Role for it), and a SIGTERM releases the Lease for the next
    # replica.  The intermediates are installed: the other test here needs no controller.
    import socket

    def lease():
        return api.get("Lease", "meshlet-system", "meshlet-ca", "coordination.k8s.io/v1")["spec"]

    me = os.environ.get("POD_NAME") or socket.gethostname()
    assert lease()["holderIdentity"].startswith(me[:100] + "_") and lease()["leaseTransitions"] == 0
    ctl.terminate()
    assert ctl.wait(15) == 0
    assert lease()["holderIdentity"] == "" and lease()["leaseDurationSeconds"] == 1


def test_a_node_refuses_to_sign_for_a_pod_on_another_node(env):
    """The issue's "a CSR for a pod on another node is refused", with the
    intermediate the node got by CSR: node1's signer answers only for the
    service accounts of pods the API places on node1."""
    mesh, _api, _start, _work = env
    wait_for(lambda: "node_ca" in mesh.status("node1")["identity"], "node1's intermediate", timeout=60)

    td = mesh.trust_domain
    other = f"spiffe://{td}/ns/default/sa/{mesh.cluster.pod('pod2-1').service_account}"
    own = f"spiffe://{td}/ns/default/sa/{mesh.cluster.pod('pod1-1').service_account}"
    if other == own:
        pytest.skip("the simulated pods share a service account")
    resp = ask_node_ca(mesh, "node1", other)
    assert resp["ok"] is False and resp["reason"] == "not_on_node", resp
    assert ask_node_ca(mesh, "node1", own)["ok"] is True
