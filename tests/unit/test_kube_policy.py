"""Policies from the cluster (agent/workloads/kubepolicy.py) against the
test API server: the watcher feeds the agent's real policy store, writes
each object's status, and keeps the last set while the API is away.

Timeouts are shrunk; no test asserts how long anything took, only what
the store and the objects end up holding."""

from __future__ import annotations

import copy
import time

import pytest

from agent.identity.spiffe import parse_spiffe_id
from agent.policy.evaluate import Request, evaluate
from agent.policy.store import PolicyStore
from agent.traffic.trafficpolicy import TRAFFIC_KIND
from agent.workloads.kubeclient import KubeClient
from agent.workloads.kubepolicy import PolicyWatcher, replace_store
from tests.support import kubeapi as k

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)

WAIT = 30.0
MESHLET = "meshlet.io/v1alpha1"
ISTIO = "security.istio.io/v1"


@pytest.fixture(autouse=True)
def _collect_sockets():
    yield
    import gc

    gc.collect()


def deny(name: str = "deny-admin", port: int = 8080, ns: str = "shop", api_version: str = MESHLET) -> dict:
    return {
        "apiVersion": api_version, "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [str(port)]}}]}]},
    }


def denied(store: PolicyStore, port: int, ns: str = "shop") -> bool:
    req = Request(
        destination_namespace=ns, destination_labels={}, destination_port=port,
        source_principal=parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/storefront"),
    )
    return not evaluate(store.policyset, req).allowed


def wait_for(cond, what: str, timeout: float = WAIT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def status_patches(api: k.FakeKubeAPI) -> list[str]:
    with api.cond:
        return [p for m, p, _q in api.requests if m == "PATCH" and p.endswith("/status")]


def accepted(api: k.FakeKubeAPI, name: str, ns: str = "shop", kind: str = "AuthorizationPolicy"):
    conds = (api.get(kind, ns, name, MESHLET).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Accepted"), None)


@pytest.fixture
def api(tmp_path):
    srv = k.FakeKubeAPI(workdir=str(tmp_path), bookmark_interval=0.2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Node:
    """One node's policy store and watcher (what the agent wires together)."""

    def __init__(self, api: k.FakeKubeAPI, path, store: PolicyStore | None = None, **kw):
        self.store = store or PolicyStore(str(path), kinds=[TRAFFIC_KIND])
        self.applies: list[int] = []

        def apply(sources):
            replace_store(self.store, sources)
            self.applies.append(len(sources))

        client = KubeClient.from_kubeconfig(api.kubeconfig(str(path) + ".kubeconfig"))
        opts = dict(trust_domain="cluster.local", root_namespace="istio-system", recheck=0.2, settle=0.1,
                    watch_timeout=2, request_timeout=2, backoff=(0.05, 0.3), status_jitter=0.05)
        opts.update(kw)
        self.watch = PolicyWatcher(client, apply, **opts)

    def start(self) -> Node:
        self.watch.start()
        assert self.watch.wait_applied(WAIT), self.watch.not_synced()
        return self


@pytest.fixture
def node(api, tmp_path):
    made: list[Node] = []

    def make(name: str = "node1", **kw) -> Node:
        n = Node(api, tmp_path / name, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.watch.close()


def test_an_initial_list_of_1000_objects_is_one_apply(api, node):
    api.apply_many(deny(f"deny-{i}", 1000 + i) for i in range(1000))
    n = node().start()
    assert n.applies == [1000]
    assert n.store.count == 1000 and denied(n.store, 1999)
    # the objects get their status (a thousand writes take a while: the
    # first ones are enough here), and the status events apply nothing
    wait_for(lambda: n.watch.counts["status_writes"] >= 20, "status writes")
    objs = api.find("AuthorizationPolicy", MESHLET)
    written = [o for o in objs if (o.get("status") or {}).get("conditions")]
    assert len(written) >= 20
    assert all(o["status"]["conditions"][0]["status"] == "True" for o in written)
    time.sleep(0.5)
    assert n.applies == [1000]


def test_added_modified_deleted_objects_reach_the_store(api, node):
    n = node().start()
    assert n.store.count == 0 and n.applies == [0]
    api.apply(deny(port=8080))
    wait_for(lambda: denied(n.store, 8080), "the DENY applied")
    api.apply(deny(port=9090))
    wait_for(lambda: denied(n.store, 9090) and not denied(n.store, 8080), "the edit applied")
    tp = {"apiVersion": MESHLET, "kind": "TrafficPolicy",
          "metadata": {"name": "backend", "namespace": "shop"},
          "spec": {"service": "backend", "retries": {"attempts": 2}}}
    api.apply(tp)
    wait_for(lambda: n.store.summary()["byKind"].get("TrafficPolicy") == 1, "the traffic policy")
    api.delete("AuthorizationPolicy", "shop", "deny-admin", MESHLET)
    wait_for(lambda: not denied(n.store, 9090), "the delete applied")
    assert [r["name"] for r in n.store.list()] == ["backend"]


def test_a_broken_edit_is_refused_in_status_and_the_previous_generation_stays(api, node):
    api.apply(deny(port=8080))
    n = node().start()
    wait_for(lambda: (accepted(api, "deny-admin") or {}).get("status") == "True", "Accepted True")
    broken = copy.deepcopy(deny(port=8080))
    broken["spec"]["rules"][0]["from"] = [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]
    api.apply(broken)
    cond = wait_for(
        lambda: (c := accepted(api, "deny-admin")) and c["status"] == "False" and c, "Accepted False"
    )
    assert cond["reason"] == "Invalid" and cond["observedGeneration"] == 2
    assert "remoteIpBlocks" in cond["message"]
    assert cond["message"].endswith("generation 1 stays in force")
    st = api.get("AuthorizationPolicy", "shop", "deny-admin", MESHLET)["status"]
    assert st["lastAccepted"]["generation"] == 1
    assert denied(n.store, 8080)  # the DENY did not go away with the broken edit
    assert n.watch.describe()["refused_total"] == 1

    # a node that starts now never saw generation 1: it takes it from the
    # status, enforces the same DENY and agrees with the status (writes nothing)
    writes = len(status_patches(api))
    late = node("node2").start()
    assert denied(late.store, 8080)
    late.watch.reconcile()
    time.sleep(0.3)
    assert len(status_patches(api)) == writes and late.watch.counts["status_writes"] == 0

    # fixed: accepted again, everywhere
    api.apply(deny(port=9090))
    wait_for(lambda: denied(n.store, 9090) and denied(late.store, 9090), "the fix on both nodes")
    wait_for(lambda: (accepted(api, "deny-admin") or {}).get("status") == "True", "Accepted True again")


def test_a_refused_object_never_accepted_enforces_nothing(api, node):
    custom = {**deny("ext"), "spec": {"action": "CUSTOM", "provider": {"name": "ext"}}}
    api.apply(custom)
    api.apply(deny(port=8080))
    n = node().start()
    assert n.store.count == 1 and denied(n.store, 8080)
    cond = wait_for(lambda: accepted(api, "ext"), "a condition")
    assert cond["status"] == "False" and cond["message"].endswith("nothing of this resource is enforced")
    assert "lastAccepted" not in api.get("AuthorizationPolicy", "shop", "ext", MESHLET)["status"]


def test_status_is_written_once_and_not_again_when_equal(api, node):
    api.apply(deny())
    a = node("node1").start()
    wait_for(lambda: a.watch.counts["status_writes"] == 1, "one status write")
    before = api.get("AuthorizationPolicy", "shop", "deny-admin", MESHLET)
    b = node("node2").start()
    for _ in range(3):
        a.watch.reconcile()
        b.watch.reconcile()
    time.sleep(0.3)
    assert len(status_patches(api)) == 1
    assert b.watch.counts["status_writes"] == 0
    after = api.get("AuthorizationPolicy", "shop", "deny-admin", MESHLET)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_status_write_failures_are_retried_and_do_not_hold_enforcement(api, node):
    status = "/apis/meshlet.io/v1alpha1/namespaces/shop/authorizationpolicies/deny-admin/status"
    api.fail(503, times=3, path=status, method="PATCH")
    api.apply(deny())
    n = node().start()
    assert denied(n.store, 8080)
    wait_for(lambda: (accepted(api, "deny-admin") or {}).get("status") == "True", "the status, eventually")
    assert n.watch.counts["status_errors"] >= 1


def test_istio_policies_are_read_once_their_crd_appears(api, node):
    n = node().start()
    istio = next(r for r in n.watch.reflectors if r.resource.api_version == ISTIO)
    assert istio.absent and istio.synced.is_set()
    assert not n.watch.describe()["resources"][2]["installed"]
    api.istio = True
    api.apply(deny("istio-deny", 7070, api_version=ISTIO))
    wait_for(lambda: denied(n.store, 7070), "Istio's DENY enforced")
    assert not istio.absent
    # meshlet writes no status on Istio's objects (Istio owns it)
    assert not any("security.istio.io" in p for p in status_patches(api))


def test_an_api_outage_keeps_the_set_and_changes_after_it_apply(api, node):
    api.apply(deny(port=8080))
    n = node().start()
    api.stop()
    wait_for(lambda: not n.watch.describe()["in_sync"], "the outage noticed")
    time.sleep(0.5)
    assert denied(n.store, 8080) and n.store.count == 1
    assert n.applies == [1]
    api.delete("AuthorizationPolicy", "shop", "deny-admin", MESHLET)  # while the node cannot see it
    api.apply(deny("other", 9090))
    api.start()
    wait_for(lambda: denied(n.store, 9090) and not denied(n.store, 8080), "the changes after the outage")
    # every kind's reflector relists on its own backoff: the ones with nothing
    # to change may still be reconnecting when the first one applied
    wait_for(lambda: n.watch.describe()["in_sync"], "every kind in sync again")


def test_the_first_apply_waits_for_every_kind(api, node):
    api.fail(500, times=2, path="/apis/meshlet.io/v1alpha1/trafficpolicies")
    api.apply(deny())
    n = node().start()
    assert n.applies == [1]


# --- `meshlet policy apply|diff|delete --kubeconfig`: the CLI writing the CRs ---------


def cli(*args):
    from click.testing import CliRunner

    from agent.cli import main

    return CliRunner().invoke(main, ["policy", *args], catch_exceptions=False)


def write(path, *docs) -> str:
    import yaml

    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def test_the_cli_writes_the_crs_and_reports_what_the_nodes_said(api, node, tmp_path):
    n = node().start()
    kc = api.kubeconfig(str(tmp_path / "cli.kubeconfig"))
    tp = {"apiVersion": MESHLET, "kind": "TrafficPolicy",
          "metadata": {"name": "backend", "namespace": "shop"}, "spec": {"service": "backend"}}
    f = write(tmp_path / "p.yaml", deny(port=8080), tp)

    r = cli("diff", "--kubeconfig", kc, "-f", f)
    assert r.exit_code == 1 and "+++ b/authorizationpolicy.meshlet.io/shop/deny-admin" in r.output

    r = cli("apply", "--kubeconfig", kc, "-f", f, "--timeout", str(WAIT))
    assert r.exit_code == 0, r.output
    assert "authorizationpolicy.meshlet.io shop/deny-admin created" in r.output
    assert "authorizationpolicy.meshlet.io shop/deny-admin accepted (generation 1)" in r.output
    assert "trafficpolicy.meshlet.io shop/backend accepted (generation 1)" in r.output
    assert denied(n.store, 8080)

    assert cli("diff", "--kubeconfig", kc, "-f", f).exit_code == 0
    r = cli("apply", "--kubeconfig", kc, "-f", f, "-o", "json", "--timeout", str(WAIT))
    assert r.exit_code == 0
    import json

    out = json.loads(r.output)
    assert [(c["name"], c["result"], c["accepted"]) for c in out["changes"]] == [
        ("deny-admin", "unchanged", True), ("backend", "unchanged", True)]

    # an edit: replaced at the resourceVersion read, generation 2
    f2 = write(tmp_path / "p2.yaml", deny(port=9090))
    r = cli("apply", "--kubeconfig", kc, "-f", f2, "--timeout", str(WAIT))
    assert r.exit_code == 0 and "configured" in r.output and "accepted (generation 2)" in r.output
    wait_for(lambda: denied(n.store, 9090), "the edit enforced")

    r = cli("delete", "--kubeconfig", kc, "deny-admin", "-n", "shop")
    assert r.exit_code == 0 and "deleted" in r.output
    wait_for(lambda: not denied(n.store, 9090), "the delete enforced")
    r = cli("delete", "--kubeconfig", kc, "deny-admin", "-n", "shop")
    assert r.exit_code == 1 and "no policy shop/deny-admin" in r.output


def test_the_cli_refuses_a_bad_file_before_writing_anything(api, tmp_path):
    kc = api.kubeconfig(str(tmp_path / "cli.kubeconfig"))
    bad = copy.deepcopy(deny("b"))
    bad["spec"]["action"] = "CUSTOM"
    f = write(tmp_path / "p.yaml", deny("a"), bad)
    r = cli("apply", "--kubeconfig", kc, "-f", f)
    assert r.exit_code == 1
    assert f"{f}:" in r.output and "spec.action" in r.output
    assert api.find("AuthorizationPolicy", MESHLET) == []


def test_the_cli_says_when_no_node_reports(api, tmp_path):
    kc = api.kubeconfig(str(tmp_path / "cli.kubeconfig"))
    r = cli("apply", "--kubeconfig", kc, "-f", write(tmp_path / "p.yaml", deny()), "--timeout", "0.5")
    assert r.exit_code == 1 and "no node reported" in r.output
    assert len(api.find("AuthorizationPolicy", MESHLET)) == 1  # written all the same
    r = cli("apply", "--kubeconfig", kc, "-f", str(tmp_path / "p.yaml"), "--no-wait")
    assert r.exit_code == 0 and "unchanged" in r.output


def test_the_cli_names_a_missing_istio_crd(api, tmp_path):
    kc = api.kubeconfig(str(tmp_path / "cli.kubeconfig"))
    r = cli("apply", "--kubeconfig", kc, "-f", write(tmp_path / "p.yaml", deny(api_version=ISTIO)))
    assert r.exit_code == 1 and "Istio's AuthorizationPolicy CRD installed" in r.output
    # installed: written as Istio's object (no meshlet status to wait for), deleted again
    api.istio = True
    r = cli("apply", "--kubeconfig", kc, "-f", str(tmp_path / "p.yaml"))
    assert r.exit_code == 0 and "authorizationpolicy.security.istio.io shop/deny-admin created" in r.output
    assert [o["apiVersion"] for o in api.find("AuthorizationPolicy", ISTIO)] == [ISTIO]
    r = cli("delete", "--kubeconfig", kc, "deny-admin", "-n", "shop")
    assert r.exit_code == 0 and "authorizationpolicy.security.istio.io shop/deny-admin deleted" in r.output
    assert api.find("AuthorizationPolicy", ISTIO) == []


def test_the_cli_reports_a_refusal_by_the_nodes(api, node, tmp_path):
    """Two TrafficPolicies for one service port, one in the cluster already,
    one from a file that loads alone: the nodes refuse the second."""
    node().start()
    kc = api.kubeconfig(str(tmp_path / "cli.kubeconfig"))
    tp = {"apiVersion": MESHLET, "kind": "TrafficPolicy", "metadata": {"name": "a", "namespace": "shop"},
          "spec": {"service": "backend"}}
    api.apply(tp)
    other = {**tp, "metadata": {"name": "b", "namespace": "shop"}}
    r = cli("apply", "--kubeconfig", kc, "-f", write(tmp_path / "p.yaml", other), "--timeout", str(WAIT))
    assert r.exit_code == 1
    assert "trafficpolicy.meshlet.io shop/b REFUSED (generation 1)" in r.output
    assert "nothing of this resource is enforced" in r.output


def test_the_agent_refuses_local_changes_in_kubernetes_mode(api, node, tmp_path):
    import threading

    from agent.admin import _policies_route

    n = node().start()

    class KubeAgent:
        policies, policy_lock, inventory, policy_watch = n.store, threading.Lock(), None, n.watch

    code, body = _policies_route(KubeAgent(), "POST", "/v1/policies:apply", b'{"files": []}')
    assert code == 409 and body["source"] == "kubernetes" and "--kubeconfig" in body["error"]
    code, body = _policies_route(KubeAgent(), "DELETE", "/v1/policies/shop/x", b"")
    assert code == 409
    code, body = _policies_route(KubeAgent(), "GET", "/v1/policies", b"")
    assert code == 200


def test_status_says_where_policies_come_from_and_what_was_refused(api, node):
    from agent.cli.policykube import status_lines

    assert status_lines(None) == []
    custom = {**deny("ext"), "spec": {"action": "CUSTOM", "provider": {"name": "ext"}}}
    api.apply(custom)
    n = node().start()
    lines = status_lines(n.watch.describe())
    assert lines[0] == f"from the cluster ({api.url}): 1 objects, in sync"
    assert lines[1] == (
        "not installed (checked again periodically): AuthorizationPolicy.security.istio.io, "
        "RequestAuthentication.security.istio.io"
    )
    assert lines[2].startswith(
        "REFUSED meshlet.io/v1alpha1/AuthorizationPolicy/shop/ext generation 1 (nothing of it enforced): "
        "spec.action")


def _node_role_grants() -> set[tuple[str, str]]:
    """deploy/rbac.yaml's meshlet-node ClusterRole as the test server's (verb, resource) pairs."""
    from tests.support.kubeschema import DEPLOY, load_docs

    role = next(d for d in load_docs(DEPLOY / "rbac.yaml")
                if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "meshlet-node")
    return {(v, f"{g}/{r}" if g else r)
            for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_the_node_role_of_deploy_rbac_is_enough_and_istio_is_read_only(api, tmp_path):
    """The watcher with a token holding exactly the node agent's ClusterRole:
    lists, watches, writes status; the test server refuses anything else."""
    api.add_user("node-token", "system:serviceaccount:meshlet-system:meshlet-node", allow=_node_role_grants())
    api.istio = True
    api.apply(deny())
    api.apply(deny("istio-deny", 7070, api_version=ISTIO))
    store = PolicyStore(str(tmp_path / "n"), kinds=[TRAFFIC_KIND])
    client = KubeClient.from_kubeconfig(api.kubeconfig(str(tmp_path / "node.kubeconfig"), token="node-token"))
    w = PolicyWatcher(client, lambda s: replace_store(store, s), trust_domain="cluster.local",
                      root_namespace="istio-system", settle=0.05, watch_timeout=2, request_timeout=2,
                      backoff=(0.05, 0.3), status_jitter=0.05).start()
    try:
        assert w.wait_applied(WAIT), w.not_synced()
        assert denied(store, 8080) and denied(store, 7070)
        wait_for(lambda: (accepted(api, "deny-admin") or {}).get("status") == "True",
                 "status with the node role")
        assert w.counts["status_errors"] == 0
        # and the role cannot write the policies themselves
        from agent.workloads.kubeclient import ApiError

        with pytest.raises(ApiError) as e:
            client.create("/apis/meshlet.io/v1alpha1/namespaces/shop/authorizationpolicies", deny("x"))
        assert e.value.status == 403
    finally:
        w.close()


JWKS = ('{"keys":[{"kty":"EC","crv":"P-256","x":"aazY3kBiKMNAgRQSuBBHXihPjUqGE_RGFI8jFWzQLwg",'
        '"y":"pVWItWO5J1bxr2w8DcI_FpWfJGeKT0dbrdCBuFVr8zs","kid":"k1","alg":"ES256"}]}')


def request_authn(name: str, api_version: str = MESHLET, **rule) -> dict:
    return {"apiVersion": api_version, "kind": "RequestAuthentication",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "orders"}},
                     "jwtRules": [{"issuer": "https://login.example", "jwks": JWKS, **rule}]}}


def test_request_authentications_from_the_cluster(api, node):
    """End-user JWT rules are policy objects like the others: meshlet's kind
    (with its status) and Istio's once its CRD is there reach every node's
    store; a broken one is refused in status and enforces nothing."""
    api.apply(request_authn("orders-login"))
    n = node().start()
    assert n.store.summary()["byKind"].get("RequestAuthentication") == 1
    cond = wait_for(lambda: accepted(api, "orders-login", kind="RequestAuthentication"), "a condition")
    assert cond["status"] == "True"

    api.apply(request_authn("cookies", fromCookies=["session"]))  # meshlet does not read cookies
    cond = wait_for(lambda: accepted(api, "cookies", kind="RequestAuthentication"), "the refusal")
    assert cond["status"] == "False" and "fromCookies" in cond["message"]
    assert n.store.summary()["byKind"].get("RequestAuthentication") == 1

    api.istio = True
    api.apply(request_authn("istio-login", ISTIO))
    wait_for(lambda: n.store.summary()["byKind"].get("RequestAuthentication") == 2, "Istio's kind read")


class CountingStore(PolicyStore):
    """The real store, recording the version of every commit it makes."""

    def __init__(self, *a, **kw):
        self.commits: list[str] = []
        super().__init__(*a, **kw)

    def _commit(self, *a, **kw) -> None:
        super()._commit(*a, **kw)
        self.commits.append(self.version)


def test_a_burst_of_deletions_is_one_store_commit(api, node, tmp_path):
    """Deleting a namespace's policies (here: 40 objects at once) is one
    commit of the store -- one new version for the proxies -- per apply,
    not one per object."""
    api.apply_many(deny(f"deny-{i}", 2000 + i, ns="gone") for i in range(40))
    api.apply(deny("stays", 8080))
    store = CountingStore(str(tmp_path / "store"), kinds=[TRAFFIC_KIND])
    n = node(store=store).start()
    assert store.count == 41 and store.commits == [store.version]
    applies = len(n.applies)
    with api.cond:  # the deletions reach the watch together, as a namespace deletion's do
        for i in range(40):
            api.delete("AuthorizationPolicy", "gone", f"deny-{i}", MESHLET)
    wait_for(lambda: store.count == 1, "the deletions applied")
    bursts = len(n.applies) - applies
    assert len(store.commits) == 1 + bursts  # one commit per apply, whatever it deletes
    assert bursts < 40 and denied(store, 8080) and not denied(store, 2000, ns="gone")
    assert [r["name"] for r in store.list()] == ["stays"]


def test_a_set_over_the_store_limit_changes_nothing_and_says_why(api, node, tmp_path):
    """At the store's size limit the cluster's set is refused whole: the
    error names the size and the limit, the previous set stays in force,
    and once the set fits again it is applied."""
    api.apply(deny("small", 8080))
    store = PolicyStore(str(tmp_path / "store"), kinds=[TRAFFIC_KIND], max_bytes=4096)
    n = node(store=store).start()
    assert denied(store, 8080)
    version = store.version
    api.apply_many(deny(f"more-{i}", 3000 + i) for i in range(30))  # ~30 x 250 bytes > 4 KiB
    err = wait_for(lambda: n.watch.apply_error, "the refusal")
    assert "StoreFull: the cluster's policy set: " in err and "bytes of policy text in 31 documents" in err
    assert "the policy store's limit is 4096 bytes (workloads.maxPolicyBytes" in err
    assert f"the previous set (version {version}) stays in force" in err
    assert store.version == version and store.count == 1 and not denied(store, 3000)
    with api.cond:
        for i in range(25):
            api.delete("AuthorizationPolicy", "shop", f"more-{i}", MESHLET)
    wait_for(lambda: store.count == 6, "the smaller set applied")
    wait_for(lambda: n.watch.apply_error is None, "the error cleared")
    assert denied(store, 3029) and not denied(store, 3000)
