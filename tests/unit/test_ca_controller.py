"""`meshlet ca controller` and the node's CSR client against the test API
server (tests.support.kubeapi): a node gets its intermediate and it chains
to the root; a node cannot get another node's; the node's service account
cannot approve (its permissions are built from deploy/rbac.yaml, so the
manifest is what is tested); restarts and API outages neither sign twice
nor lose a request."""

from __future__ import annotations

import base64
import os
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from agent.identity import csrpolicy as cp
from agent.identity.ca import init_ca, load_signing_root
from agent.identity.controller import CSRS, CaController, HealthServer
from agent.identity.issuer import NodeIssuer, load_material
from agent.identity.leader import LeaderElector
from agent.identity.leaderlease import LeaseConfig
from agent.identity.nodecsr import NodeEnroller
from agent.identity.spiffe import workload_id
from agent.identity.svid import generate_key, issuing_node, make_csr, verify_svid
from agent.workloads.kubeclient import ApiError, KubeClient
from tests.support import kubeapi as k
from tests.support.kubeschema import DEPLOY, load_docs

TD = "cluster.local"
CA_USER = "system:serviceaccount:meshlet-system:meshlet-ca"


def rbac_allow(account: str) -> set[tuple[str, ...]]:
    """What deploy/rbac.yaml grants the service account ``account`` (through
    its ClusterRoleBindings and RoleBindings), in the test API server's
    spelling (``<group>/<resource>``, core resources bare): (verb, resource)
    for a ClusterRole's rules, (verb, resource, namespace, name or "*") for a
    Role's (``resourceNames`` narrow it to those names)."""
    docs = list(load_docs(DEPLOY / "rbac.yaml"))
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs}
    out: set[tuple[str, ...]] = set()
    for b in docs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"]):
            continue
        ns = b["metadata"].get("namespace", "")
        kind = b["roleRef"]["kind"]
        role = roles[(kind, ns if kind == "Role" else "", b["roleRef"]["name"])]
        for rule in role["rules"]:
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    for v in rule["verbs"]:
                        res = f"{g}/{r}" if g else r
                        if role["kind"] == "ClusterRole":
                            out.add((v, res))
                        else:
                            out |= {(v, res, ns, n) for n in rule.get("resourceNames") or ["*"]}
    assert out, f"deploy/rbac.yaml grants {account} nothing"
    return out


def wait_for(what: str, pred: Callable[[], object], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, api: k.FakeKubeAPI, tmp_path):
        self.api, self.tmp = api, tmp_path
        api.apply_many([k.node("node-a", "10.0.0.1"), k.node("node-b", "10.0.0.2")])
        node_allow, ca_allow = rbac_allow("meshlet-node"), rbac_allow("meshlet-ca")
        self.electors: list[LeaderElector] = []
        for n in ("node-a", "node-b", "node-c"):  # node-c: a token bound to a node the API does not know
            api.add_user(
                f"{n}-token",
                cp.NODE_USER,
                groups=("system:serviceaccounts", "system:authenticated"),
                extra={cp.NODE_NAME_EXTRA: [n]},
                allow=node_allow,
            )
        api.add_user("ca-token", CA_USER, allow=ca_allow)
        self.ca_dir = str(tmp_path / "ca")
        self.layout = init_ca(self.ca_dir, TD, [])
        self.controllers: list[tuple[CaController, threading.Thread]] = []
        self.enrollers: list[NodeEnroller] = []

    def client(self, token: str | None = None) -> KubeClient:
        path = str(self.tmp / f"kc-{token or 'admin'}.yaml")
        return KubeClient.from_kubeconfig(self.api.kubeconfig(path, token=token))

    def controller(
        self, *, lease: LeaseConfig | None = None, reissue: cp.ReissueLimit | None = None
    ) -> CaController:
        """A controller (with a leader elector on ``lease`` when given: then
        it is not waited for, as it may be a follower)."""
        elector = None
        if lease is not None:
            elector = LeaderElector(self.client("ca-token"), lease)
            self.electors.append(elector)
        ctl = CaController(
            self.client("ca-token"),
            load_signing_root(self.ca_dir, TD),
            cp.Policy(TD),
            backoff=(0.05, 0.3),
            watch_timeout=5,
            request_timeout=5,
            elector=elector,
            reissue=reissue,
        )
        t = threading.Thread(target=ctl.run, daemon=True)
        t.start()
        self.controllers.append((ctl, t))
        if elector is None:
            wait_for("the controller's first list", ctl.synced.is_set)
        else:
            elector.start()
        return ctl

    def stop_controller(self, ctl: CaController) -> None:
        for c, t in self.controllers:
            if c is ctl:
                c.stop()
                t.join(10)
                assert not t.is_alive()

    def enroller(self, node: str, token: str | None = None) -> NodeEnroller:
        d = self.tmp / node
        e = NodeEnroller(
            self.client(token or f"{node}-token"),
            node,
            TD,
            str(d / "bundle.pem"),
            str(d / "ca.pem"),
            str(d / "ca-key.pem"),
            check_interval=0.2,
            poll=(0.05, 0.3),
            retry=(0.05, 0.3),
            request_timeout=5,
        )
        self.enrollers.append(e)
        return e.start()

    def close(self) -> None:
        for e in self.enrollers:
            e.stop()
        for c, t in self.controllers:
            c.stop()
            t.join(10)
        for el in self.electors:
            el.stop()

    def csr(self, name: str) -> dict:
        return self.api.get("CertificateSigningRequest", "", name, "certificates.k8s.io/v1")

    def create_csr(self, token: str, node: str, key=None, **kw) -> str:
        obj = cp.csr_object(node, cp.make_node_csr(TD, node, key or generate_key()), **kw)
        return self.client(token).create(CSRS, obj)["metadata"]["name"]


@pytest.fixture
def cluster(tmp_path):
    with k.FakeKubeAPI(workdir=str(tmp_path)) as api:
        c = Cluster(api, tmp_path)
        try:
            yield c
        finally:
            c.close()


def _installed(e: NodeEnroller) -> bool:
    return e.install() or e.state == "valid"


def _conditions(csr: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (csr.get("status") or {}).get("conditions") or []}


def _writes(api: k.FakeKubeAPI) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _q in api.requests if m in ("PUT", "PATCH", "POST", "DELETE")]


def test_a_node_gets_its_intermediate_and_it_chains_to_the_root(cluster):
    cluster.controller()
    e = cluster.enroller("node-a")
    wait_for("node-a's intermediate", lambda: _installed(e))
    d = cluster.tmp / "node-a"
    assert stat.S_IMODE(os.stat(d / "ca-key.pem").st_mode) == 0o600
    assert not os.path.exists(d / "ca-key.pem.pending") and not os.path.exists(d / "ca-key.pem.pending.json")
    m = load_material(TD, str(d / "bundle.pem"), str(d / "ca.pem"), str(d / "ca-key.pem"))
    assert issuing_node(m.ca_cert, TD) == "node-a"
    m.ca_cert.verify_directly_issued_by(cluster.layout.root_cert)
    assert m.bundle.roots == cluster.layout.bundle.roots
    # the intermediate signs workload SVIDs that verify against the bundle
    issuer = NodeIssuer(TD, m, ttl=timedelta(hours=1), node="node-a")
    sid = workload_id(TD, "shop", "web")
    issuer.allowed = frozenset({str(sid)})
    _chain, leaf = issuer.sign(str(sid), make_csr(sid, generate_key()))
    assert verify_svid([leaf, m.ca_cert], m.bundle) == sid
    # the CSR: approved by the controller, signed once
    (csr,) = cluster.api.find("CertificateSigningRequest")
    assert _conditions(csr)["Approved"]["reason"] == "MeshletNodeIntermediate"
    assert csr["spec"]["username"] == cp.NODE_USER
    assert e.status()["state"] == "valid" and e.counters["requested"] == 1
    # valid and not due: no second request
    time.sleep(0.5)
    assert len(cluster.api.find("CertificateSigningRequest")) == 1


def test_node_a_cannot_get_node_bs_intermediate(cluster):
    ctl = cluster.controller()
    name = cluster.create_csr("node-a-token", "node-b")
    csr = wait_for("a decision", lambda: _conditions(cluster.csr(name)) and cluster.csr(name))
    cond = _conditions(csr)
    assert set(cond) == {"Denied"} and cond["Denied"]["reason"] == "WrongNode"
    assert "bound to node 'node-a'" in cond["Denied"]["message"]
    assert "certificate" not in csr.get("status", {})
    wait_for("the count", lambda: ctl.counters["denied"] == 1)
    assert ctl.counters["signed"] == 0
    # the node's client shows the reason, and asks again only after a backoff
    e = cluster.enroller("node-b", token="node-a-token")
    wait_for("the denial", lambda: e.state == "denied")
    assert "WrongNode" in e.status()["message"] and "asking again" in e.status()["message"]
    assert not os.path.exists(cluster.tmp / "node-b" / "ca.pem")


def test_an_unknown_node_is_denied(cluster):
    cluster.controller()
    name = cluster.create_csr("node-c-token", "node-c")
    csr = wait_for("a decision", lambda: _conditions(cluster.csr(name)) and cluster.csr(name))
    assert _conditions(csr)["Denied"]["reason"] == "UnknownNode"


def test_the_nodes_account_cannot_approve_sign_or_list(cluster):
    name = cluster.create_csr("node-a-token", "node-a")
    node = cluster.client("node-a-token")
    csr = node.get(f"{CSRS}/{name}")  # it may read its CSR back
    approved = {**csr, "status": {"conditions": [cp.condition("Approved", "x", "self", _now())]}}
    for sub in ("approval", "status"):
        with pytest.raises(ApiError) as e:
            node.replace(f"{CSRS}/{name}/{sub}", approved)
        assert e.value.status == 403, sub
    with pytest.raises(ApiError) as e:
        node.get(CSRS)
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        node.delete(f"{CSRS}/{name}")
    assert e.value.status == 403
    assert "status" not in cluster.csr(name)


def test_other_signers_are_left_alone(cluster):
    ctl = cluster.controller()
    other = cluster.create_csr("node-a-token", "node-a", signer="example.com/other")
    cluster.create_csr("node-a-token", "node-a")
    wait_for("our CSR signed", lambda: ctl.counters["signed"] == 1)
    assert "status" not in cluster.csr(other)
    assert not [p for m, p in _writes(cluster.api) if p.startswith(f"{CSRS}/{other}")]
    assert ctl.counters == {**ctl.counters, "approved": 1, "signed": 1, "denied": 0}


def test_a_restart_signs_nothing_twice_and_finishes_half_done_work(cluster):
    ctl = cluster.controller()
    signed = cluster.create_csr("node-a-token", "node-a")
    denied = cluster.create_csr("node-a-token", "node-b")
    wait_for("both decided", lambda: all(_conditions(cluster.csr(n)) for n in (signed, denied)))
    wait_for("signed", lambda: (cluster.csr(signed).get("status") or {}).get("certificate"))
    cert_before = cluster.csr(signed)["status"]["certificate"]
    cluster.stop_controller(ctl)
    # approved (as if the controller died between /approval and /status), not signed
    half = cluster.create_csr("node-b-token", "node-b")
    admin = cluster.client()
    body = admin.get(f"{CSRS}/{half}")
    body["status"] = {"conditions": [cp.condition("Approved", "MeshletNodeIntermediate", "m", _now())]}
    admin.replace(f"{CSRS}/{half}/approval", body)
    n_writes = len(_writes(cluster.api))
    ctl2 = cluster.controller()
    wait_for("the half-done CSR signed", lambda: ctl2.counters["signed"] == 1)
    time.sleep(0.3)
    writes = _writes(cluster.api)[n_writes:]
    assert writes == [("PUT", f"{CSRS}/{half}/status")]  # one write: the signature, nothing else
    assert cluster.csr(signed)["status"]["certificate"] == cert_before
    assert ctl2.counters["signed"] == 1 and ctl2.counters["approved"] == 0 and ctl2.counters["denied"] == 0


def test_an_approved_request_that_breaks_a_rule_fails_unsigned(cluster):
    name = cluster.create_csr("node-a-token", "node-b")
    admin = cluster.client()
    body = admin.get(f"{CSRS}/{name}")
    by_hand = cp.condition("Approved", "ByHand", "kubectl certificate approve", _now())
    body["status"] = {"conditions": [by_hand]}
    admin.replace(f"{CSRS}/{name}/approval", body)
    ctl = cluster.controller()
    csr = wait_for("Failed", lambda: "Failed" in _conditions(cluster.csr(name)) and cluster.csr(name))
    assert _conditions(csr)["Failed"]["reason"] == "WrongNode"
    assert "certificate" not in csr["status"]
    wait_for("the count", lambda: ctl.counters["failed"] == 1)


def test_api_outages_lose_nothing_and_write_nothing_half(cluster):
    ctl = cluster.controller()
    # the approval write fails once: nothing else is written, a relist finishes the job
    cluster.api.fail(503, path=CSRS, method="PUT")
    name = cluster.create_csr("node-a-token", "node-a")
    wait_for("signed after the failure", lambda: ctl.counters["signed"] == 1)
    assert ctl.counters["errors"] >= 1 and (cluster.csr(name).get("status") or {}).get("certificate")
    # the API goes away entirely while a node waits for its certificate
    cluster.api.stop()
    e = cluster.enroller("node-b")
    wait_for("the node to notice the outage", lambda: e.state == "error")
    assert "cannot reach the API" in e.status()["message"]
    wait_for("the controller to notice", lambda: not ctl.connected)
    cluster.api.start()
    wait_for("node-b's intermediate", lambda: _installed(e))
    wait_for("the count", lambda: ctl.counters["signed"] == 2)
    assert len(cluster.api.find("CertificateSigningRequest")) == 2


def test_a_restarted_node_keeps_waiting_for_the_same_request(cluster):
    e = cluster.enroller("node-a")  # no controller yet
    wait_for("waiting", lambda: e.state == "waiting")
    name = e.csr_name
    assert "waiting for CSR" in e.status()["message"] and name in e.status()["message"]
    pending = cluster.tmp / "node-a" / "ca-key.pem.pending"
    assert stat.S_IMODE(os.stat(pending).st_mode) == 0o600
    e.stop()
    e2 = cluster.enroller("node-a")
    wait_for("waiting again", lambda: e2.state == "waiting")
    assert e2.csr_name == name and len(cluster.api.find("CertificateSigningRequest")) == 1
    cluster.controller()
    wait_for("installed", lambda: _installed(e2))
    # the key that was pending is the key the certificate is for
    cert = x509.load_pem_x509_certificate((cluster.tmp / "node-a" / "ca.pem").read_bytes())
    status_cert = base64.b64decode(cluster.csr(name)["status"]["certificate"])
    assert cert == x509.load_pem_x509_certificates(status_cert)[0]


def test_health_and_counters(cluster):
    import urllib.request

    ctl = cluster.controller()
    t = next(t for c, t in cluster.controllers if c is ctl)
    srv = HealthServer(ctl, t, "127.0.0.1", 0).start()
    try:
        cluster.create_csr("node-a-token", "node-b")
        wait_for("denied", lambda: ctl.counters["denied"] == 1)
        base = f"http://127.0.0.1:{srv.port}"
        wait_for("ready", lambda: ctl.connected)
        assert urllib.request.urlopen(f"{base}/healthz").status == 200
        assert urllib.request.urlopen(f"{base}/readyz").status == 200
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert 'meshlet_ca_csr_total{result="denied"} 1' in text
    finally:
        srv.stop()


def _now() -> datetime:
    return datetime.now(UTC)


def test_the_manifests_command_line_is_what_the_controller_accepts():
    from agent.cli.ca import ca_controller

    (dep,) = [d for d in load_docs(DEPLOY / "ca-controller.yaml") if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["meshlet", "ca", "controller"]
    ctx = ca_controller.make_context("controller", list(c["args"]))
    assert ctx.params["root_dir"] == "/etc/meshlet/root" and ctx.params["signer"] == cp.SIGNER
    port = ctx.params["metrics_port"]
    assert {p["containerPort"] for p in c["ports"]} == {port}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the Secret's files are what load_signing_root reads
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/meshlet/root"] == "root"


def test_the_root_directory_is_checked_before_anything_is_signed(tmp_path):
    import shutil

    from click.testing import CliRunner

    from agent.cli.ca import ca_controller
    from agent.identity.ca import CaError, rotate_root

    d = str(tmp_path / "ca")
    init_ca(d, TD, [])
    assert load_signing_root(d, TD).cert == load_signing_root(d, TD).bundle.roots[0]
    with pytest.raises(CaError, match="trust domain 'cluster.local', not 'other.domain'"):
        load_signing_root(d, "other.domain")
    # just the Secret's three files
    secret = tmp_path / "secret"
    secret.mkdir()
    for n in ("root.pem", "root-key.pem", "bundle.pem"):
        shutil.copy(os.path.join(d, n), secret / n)
    assert load_signing_root(str(secret), TD).name_constraints is True
    # a bundle without the root: what it signed would not verify anywhere
    other = init_ca(str(tmp_path / "other"), TD, [])
    (secret / "bundle.pem").write_bytes(other.bundle.to_pem())
    with pytest.raises(CaError, match="does not hold the root"):
        load_signing_root(str(secret), TD)
    # the key of another root
    shutil.copy(os.path.join(d, "bundle.pem"), secret / "bundle.pem")
    shutil.copy(tmp_path / "other" / "root-key.pem", secret / "root-key.pem")
    with pytest.raises(CaError, match="is not the key of"):
        load_signing_root(str(secret), TD)
    # after a rotation the current root signs and the bundle carries both
    rotate_root(d)
    r = load_signing_root(d, TD)
    assert len(r.bundle.roots) == 2 and r.cert in r.bundle.roots
    # the CLI says what is missing and exits 1 before it talks to any API
    res = CliRunner().invoke(ca_controller, ["--root", str(tmp_path / "nowhere"), "--metrics-port", "0"])
    assert res.exit_code == 1 and "root.pem" in res.output and "meshlet ca init --out DIR" in res.output


def test_doctor_follows_the_node_through_waiting_denied_and_loaded(cluster):
    """`meshlet doctor`'s check on what the agent reports (its enroller's
    status, as /v1/status carries it): a warning naming the CSR while it
    waits, a required failure with the reason when denied, OK once loaded."""
    from agent.doctor import check_node_ca_csr

    e = cluster.enroller("node-a")  # no controller yet
    wait_for("waiting", lambda: e.state == "waiting")
    c = check_node_ca_csr({"node_ca_csr": e.status()})
    assert not c.ok and not c.required and e.csr_name in c.detail
    assert f"kubectl get csr {e.csr_name}" in c.fix and "meshlet ca controller" in c.fix

    cluster.controller()
    d = cluster.enroller("node-b", token="node-a-token")  # bound to node-a: denied
    wait_for("the denial", lambda: d.state == "denied")
    c = check_node_ca_csr({"node_ca_csr": d.status()})
    assert not c.ok and c.required and "WrongNode" in c.detail and d.csr_name in c.detail
    assert f"kubectl get csr {d.csr_name}" in c.fix and "asks again" in c.fix

    wait_for("node-a's intermediate", lambda: _installed(e))
    m = load_material(TD, *(str(cluster.tmp / "node-a" / f) for f in ("bundle.pem", "ca.pem", "ca-key.pem")))
    ca = {"subject": m.ca_cert.subject.rfc4514_string(), "not_after": m.ca_cert.not_valid_after_utc.isoformat()}
    c = check_node_ca_csr({"node_ca_csr": e.status(), "node_ca": ca})
    assert c.ok and ca["subject"] in c.detail and c.fix is None


def test_doctor_reads_the_nodes_csr_record_without_an_agent(cluster):
    """`meshlet doctor` with a CSR config and no agent answering: the node's
    files say it -- the request record <caKey>.pending.json the enroller
    keeps (pending since when, or why it was denied), else the intermediate."""
    import json

    from agent.config import IdentityConfig
    from agent.doctor import check_node_ca_files

    def ident(node: str) -> IdentityConfig:
        d = cluster.tmp / node
        return IdentityConfig(str(d / "bundle.pem"), str(d / "ca.pem"), str(d / "ca-key.pem"), TD, node_ca="csr")

    # nothing asked yet: a warning that says the agent asks when it runs
    c = check_node_ca_files(ident("node-a"), agent="/run/meshlet/node-a/admin.sock")
    assert not c.ok and not c.required and "no node CA and no CSR pending" in c.detail
    assert "no agent answered at /run/meshlet/node-a/admin.sock" in c.detail

    e = cluster.enroller("node-a")  # no controller yet: it waits for approval
    wait_for("waiting", lambda: e.state == "waiting")
    e.stop()  # the agent is gone; its record stays
    rec = json.loads((cluster.tmp / "node-a" / "ca-key.pem.pending.json").read_text())
    assert rec["csr"] == e.csr_name and rec["state"] == "waiting" and rec["node"] == "node-a"
    c = check_node_ca_files(ident("node-a"))
    assert not c.ok and not c.required
    assert c.detail.startswith(f"CSR {e.csr_name} pending since {rec['created']}, waiting for approval")
    assert f"kubectl get csr {e.csr_name}" in c.fix and "get lease meshlet-ca" in c.fix

    cluster.controller()
    d = cluster.enroller("node-b", token="node-a-token")  # bound to node-a: denied
    wait_for("the denial", lambda: d.state == "denied")
    d.stop()
    assert not os.path.exists(cluster.tmp / "node-b" / "ca-key.pem.pending")  # the key is dropped
    c = check_node_ca_files(ident("node-b"))
    assert not c.ok and c.required
    assert c.detail.startswith(f"CSR {d.csr_name} Denied: WrongNode: ") and "bound to node 'node-a'" in c.detail
    assert "asks again by itself" in c.fix

    # node-a's agent comes back, resumes the same request, gets it signed and installs it
    e2 = cluster.enroller("node-a")
    wait_for("node-a's intermediate", lambda: _installed(e2))
    assert e2.counters["requested"] == 0 and e2.csr_name == e.csr_name
    c = check_node_ca_files(ident("node-a"))
    assert c.ok and "node CA loaded from the files (" in c.detail and "CN=cluster.local node node-a" in c.detail

    # a record that is not one is named, not guessed at
    (cluster.tmp / "node-a" / "ca-key.pem.pending.json").write_text('{"csr": "x", "state": "lost"}')
    c = check_node_ca_files(ident("node-a"))
    assert not c.ok and "field 'state' is 'lost'" in c.detail and "ca-key.pem.pending.json" in c.detail
