"""Contract tests of the Kubernetes workload source
(agent/workloads/kubernetes.py, kubeclient.py) against the local test API
server (tests/support/kubeapi.py): real HTTPS on loopback, the real
list/watch wire protocol, objects validated against the official schema.

Timeouts and backoffs are shrunk so faults resolve in well under a second;
no test asserts how long anything took, only what the source ends up
holding and saying."""

from __future__ import annotations

import ssl
import time

import pytest

from agent.cli.node import source_lines
from agent.config import parse_config
from agent.workloads.kubeclient import ApiError, KubeClient, KubeConfigError
from agent.workloads.kubernetes import KubernetesSource
from agent.workloads.source import WorkloadSource, source_from_config
from tests.support import kubeapi as k

# A TLS socket of the watch tests (client or test API server side, not yet
# pinned down) is sometimes collected unclosed after a server stop/restart;
# the GC closes it, so no descriptor leaks, but pytest reports it in a later
# test.  Only that exact report is ignored here.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def _collect_sockets():
    """Collect such sockets before the test ends, so the report stays in this module."""
    yield
    import gc

    gc.collect()

ENABLED = {"meshlet.io/dataplane-mode": "enabled"}
WAIT = 20.0  # upper bound for anything to converge on a loaded 2-core machine


@pytest.fixture
def api(tmp_path):
    srv = k.FakeKubeAPI(workdir=str(tmp_path), bookmark_interval=0.2)
    srv.apply_many([
        k.namespace("shop", ENABLED),
        k.namespace("other"),
        k.node("node1", "198.18.0.1"),
        k.node("node2", "198.18.0.2"),
        k.pod("web", "shop", "node1", ["10.244.1.10"], labels={"app": "web"}, sa="web"),
        k.pod("db", "shop", "node2", ["10.244.2.10"], labels={"app": "db"}, sa="db"),
        k.service("db", "shop", ["10.96.0.10"], {"app": "db"}, [{"name": "pg", "port": 5432, "targetPort": 5432}]),
    ])
    srv.start()
    try:
        yield srv
    finally:
        srv.hang_watches = False
        srv.stop()


@pytest.fixture
def make_source(api, tmp_path):
    made = []
    (tmp_path / "cg" / "kubepods.slice").mkdir(parents=True)

    def make(**kw) -> KubernetesSource:
        client = KubeClient.from_kubeconfig(api.kubeconfig(str(tmp_path / "kubeconfig")))
        opts = dict(cgroup_root=str(tmp_path / "cg"), watch_timeout=2, request_timeout=1,
                    backoff=(0.05, 0.2), sync_timeout=WAIT)
        opts.update(kw)
        src = KubernetesSource(client, "node1", **opts)
        made.append(src)
        return src

    yield make
    for s in made:
        s.close()


def until(pred, what: str, timeout: float = WAIT):
    """Poll ``pred`` until it gives something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def next_inventory(src, pred=lambda inv: True, what="a new inventory"):
    box = {}

    def check():
        inv = src.poll()
        if inv is not None:
            box["inv"] = inv
        return "inv" in box and pred(box["inv"])

    until(check, what)
    return box["inv"]


def keys(inv):
    return sorted(p.key for p in inv.pods)


def test_is_a_workload_source(make_source):
    assert isinstance(make_source(), WorkloadSource)


def test_first_inventory_and_changes(api, make_source, tmp_path):
    src = make_source()
    inv = src.start()
    assert keys(inv) == ["shop/db", "shop/web"]
    web = inv.pod("shop/web")
    uid = api.get("Pod", "shop", "web")["metadata"]["uid"].replace("-", "_")
    assert web.mesh and web.cgroup == str(
        tmp_path / "cg" / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{uid}.slice")
    assert [s.key for s in inv.services] == ["shop/db"]
    assert src.poll() is None  # nothing changed

    # created, relabelled (opted out), deleted
    api.apply(k.pod("api", "shop", "node1", ["10.244.1.11"], labels={"app": "api"}))
    inv = next_inventory(src, lambda i: "shop/api" in keys(i), "the new pod")
    api.patch_labels("Pod", "shop", "api", {"meshlet.io/dataplane-mode": "disabled"})
    inv = next_inventory(src, lambda i: not i.pod("shop/api").mesh, "the opt-out")
    api.delete("Pod", "shop", "api")
    inv = next_inventory(src, lambda i: "shop/api" not in keys(i), "the deletion")
    # a namespace switched to strict
    api.patch_labels("Namespace", "", "shop", {"meshlet.io/mode": "strict"})
    inv = next_inventory(src, lambda i: "shop" in i.namespaces, "the namespace mode")
    assert inv.mode_for(inv.pod("shop/web"), "permissive") == "strict"
    d = src.describe()
    assert (d.kind, d.where, d.error) == ("kubernetes", api.url, None)
    assert d.detail["in_sync"] and d.detail["cgroup_driver"] == "systemd"


def test_status_changes_that_meshlet_does_not_use_build_nothing(api, make_source):
    src = make_source()
    src.start()
    pod = api.get("Pod", "shop", "web")
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    api.apply(pod)
    until(lambda: src.reflectors["Pod"].counts["events"] >= 1, "the MODIFIED event")
    assert src.poll() is None


@pytest.mark.parametrize("gone_as", ["event", "status"])
def test_relist_on_410_after_server_restart(api, make_source, gone_as):
    api.gone_as = gone_as
    src = make_source()
    src.start()
    pods = src.reflectors["Pod"]
    api.stop()
    # While the server is down, objects change and history is compacted:
    # the watch cannot resume, only a relist sees the deletion.
    api.delete("Pod", "shop", "web")
    api.compact()
    api.rv += 5
    api.start()
    inv = next_inventory(src, lambda i: "shop/web" not in keys(i), "the relisted state")
    assert keys(inv) == ["shop/db"]
    assert pods.counts["lists"] >= 2


@pytest.mark.parametrize("bookmarks", [True, False])
def test_bookmarks_spare_a_relist(api, make_source, bookmarks):
    api.bookmark_interval = 0.1 if bookmarks else None
    src = make_source()
    src.start()
    pods = src.reflectors["Pod"]
    api.apply(k.service("web", "shop", ["10.96.0.11"], {"app": "web"}, [{"port": 80}]))  # not a pod
    until(lambda: src.reflectors["Service"].rv == str(api.rv), "the service event")
    if bookmarks:
        until(lambda: pods.rv == str(api.rv), "a bookmark advancing the pods' resourceVersion")
    else:
        time.sleep(0.3)
        assert pods.rv != str(api.rv)
    lists = pods.counts["lists"]
    api.compact()  # history before now is gone
    api.restart()
    until(lambda: pods.counts["watches"] >= 2 and pods.connected, "the pods' watch to reopen")
    assert pods.counts["lists"] == (lists if bookmarks else lists + 1)


def test_outage_keeps_last_state_and_says_how_stale(api, make_source):
    src = make_source()
    inv = src.start()
    api.stop()
    until(lambda: not (d := src.describe()).detail["in_sync"] and d.error, "the source to notice the outage")
    api.apply(k.pod("late", "shop", "node1", ["10.244.1.12"]))
    time.sleep(0.3)
    assert src.poll() is None  # fail static: the last good inventory stays in force
    d = src.describe()
    assert d.error and d.detail["stale_s"] is not None
    lines = source_lines(d.to_dict())
    assert lines[0].startswith("kubernetes: NOT IN SYNC, last good state kept; stale ")
    api.start()
    inv = next_inventory(src, lambda i: "shop/late" in keys(i), "the state after the outage")
    assert keys(inv) == ["shop/db", "shop/late", "shop/web"]
    until(lambda: src.describe().detail["in_sync"], "in sync again")
    assert src.describe().error is None


def test_hung_watch_is_detected_and_reopened(api, make_source):
    src = make_source(watch_timeout=1, request_timeout=0.5)
    src.start()
    pods = src.reflectors["Pod"]
    api.hang_watches = True
    api.restart()  # cut the open watches; the new ones hang
    api.apply(k.pod("api", "shop", "node1", ["10.244.1.11"]))
    until(lambda: pods.error and "no data for" in pods.error, "the hung watch to time out")
    assert src.poll() is None or "shop/api" not in keys(src.inventory)
    api.hang_watches = False
    next_inventory(src, lambda i: "shop/api" in keys(i), "the pod after the hang")


def test_duplicate_and_out_of_order_events_are_dropped(api, make_source):
    src = make_source()
    src.start()
    pods = src.reflectors["Pod"]
    v1 = api.get("Pod", "shop", "web")
    api.patch_labels("Pod", "shop", "web", {"version": "2"})
    next_inventory(src, lambda i: i.pod("shop/web").labels.get("version") == "2", "v2")
    v2 = api.get("Pod", "shop", "web")
    dropped = pods.counts["dropped"]
    api.inject("pods", "MODIFIED", v2)  # a duplicate
    api.inject("pods", "MODIFIED", v1)  # an older version, late
    until(lambda: pods.counts["dropped"] == dropped + 2, "both events dropped")
    assert src.poll() is None
    # A deletion, then a late ADDED of the object from before it: stays deleted.
    gone = api.delete("Pod", "shop", "web")
    next_inventory(src, lambda i: "shop/web" not in keys(i), "the deletion")
    assert int(gone["metadata"]["resourceVersion"]) > int(v2["metadata"]["resourceVersion"])
    api.inject("pods", "ADDED", v2)
    until(lambda: pods.counts["dropped"] == dropped + 3, "the late ADDED dropped")
    assert src.poll() is None
    # Recreated for real (newer resourceVersion): back.
    api.apply(k.pod("web", "shop", "node1", ["10.244.1.10"]))
    next_inventory(src, lambda i: "shop/web" in keys(i), "the recreated pod")


def test_error_event_relists(api, make_source):
    src = make_source()
    src.start()
    pods = src.reflectors["Pod"]
    lists = pods.counts["lists"]
    api.inject("pods", "ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                 "message": "internal error", "reason": "InternalError", "code": 500})
    until(lambda: pods.counts["lists"] > lists, "a relist after the ERROR event")


def test_429_and_5xx_are_retried(api, make_source):
    api.fail(429, 2, retry_after=0, path="/api/v1/pods", watch=False)
    api.fail(503, 1, path="/api/v1/nodes", watch=False)
    api.fail(500, 1, path="/api/v1/namespaces", watch=True)
    src = make_source()
    inv = src.start()
    assert keys(inv) == ["shop/db", "shop/web"]
    pod_lists = [r for r in api.requests if r[1] == "/api/v1/pods" and "watch" not in r[2]]
    assert len(pod_lists) >= 3
    assert src.reflectors["Pod"].counts["errors"] >= 2
    until(lambda: src.describe().detail["in_sync"], "every watch open")


def test_ten_thousand_objects_in_pages(api, make_source):
    api.apply_many(
        k.pod(f"p{i}", "shop", "node2" if i % 2 else "node1", [f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"],
              labels={"app": f"a{i % 50}"})
        for i in range(10_000)
    )
    src = make_source(page_size=500, sync_timeout=120)
    inv = src.start()
    assert len(inv.pods) == 10_002
    assert len(inv.pods_on("node1")) == 5_001
    pages = [r for r in api.requests if r[1] == "/api/v1/pods" and "continue" in r[2]]
    assert all(r[2].get("limit") == "500" for r in pages)
    # 10,002 objects in pages of 500: 21 requests, 20 of them continue one.  On a
    # loaded machine a page may time out and the list start again from the top,
    # so count the distinct pages asked for, not the requests.
    assert len({r[2]["continue"] for r in pages}) == 20


def test_wrong_token_fails_start_naming_the_cause(api, tmp_path):
    client = KubeClient.from_kubeconfig(api.kubeconfig(str(tmp_path / "kc"), token="wrong"))
    src = KubernetesSource(client, "node1", cgroup_root=str(tmp_path), sync_timeout=1, backoff=(0.05, 0.1))
    with pytest.raises(TimeoutError, match="401 Unauthorized.*is the service account token valid"):
        src.start()


def test_tls_is_verified(api, tmp_path):
    (tmp_path / "other").mkdir()
    other = k.FakeKubeAPI(workdir=str(tmp_path / "other"))  # never started: only its CA is used
    ctx = ssl.create_default_context(cafile=other.ca_file)  # a CA that did not sign the server
    client = KubeClient(api.url, ctx, token=api.token)
    with pytest.raises(ApiError, match="TLS: CERTIFICATE_VERIFY_FAILED"):
        client.get("/api/v1/nodes")
    ok = KubeClient(api.url, ssl.create_default_context(cafile=api.ca_file), token=api.token)
    assert [n["metadata"]["name"] for n in ok.get("/api/v1/nodes")["items"]] == ["node1", "node2"]


# --- the test server itself: selectors, paging, schema ---------------------------------


def test_server_list_selectors_and_namespaces(api):
    c = KubeClient(api.url, ssl.create_default_context(cafile=api.ca_file), token=api.token)

    def names(path, **q):
        return [o["metadata"]["name"] for o in c.get(path, q)["items"]]

    assert names("/api/v1/pods", fieldSelector="spec.nodeName=node1") == ["web"]
    assert names("/api/v1/pods", fieldSelector="spec.nodeName!=node1,status.phase=Running") == ["db"]
    assert names("/api/v1/pods", labelSelector="app in (db, web)") == ["db", "web"]
    assert names("/api/v1/pods", labelSelector="app,app notin (db)") == ["web"]
    assert names("/api/v1/pods", labelSelector="!app") == []
    assert names("/api/v1/namespaces/other/pods") == []
    assert names("/apis/discovery.k8s.io/v1/endpointslices") == []
    doc = c.get("/api/v1/pods")
    assert doc["kind"] == "PodList" and doc["metadata"]["resourceVersion"] == str(api.rv)
    with pytest.raises(ApiError) as e:
        c.get("/api/v1/pods", {"fieldSelector": "spec.bogus=1"})
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        c.get("/api/v1/nodes", {"fieldSelector": "spec.nodeName=x"})
    assert e.value.status == 400


def test_server_watch_selector_transitions_and_timeout(api):
    c = KubeClient(api.url, ssl.create_default_context(cafile=api.ca_file), token=api.token)
    rv = c.get("/api/v1/pods")["metadata"]["resourceVersion"]
    w = c.watch("/api/v1/pods", {"resourceVersion": rv, "labelSelector": "tier=front", "timeoutSeconds": "2",
                                 "allowWatchBookmarks": "true"}, read_timeout=10)
    api.patch_labels("Pod", "shop", "web", {"tier": "front"})  # enters the selector
    api.patch_labels("Pod", "shop", "web", {"tier": "back"})  # leaves it
    api.patch_labels("Pod", "shop", "db", {"x": "y"})  # never in it
    seen = []
    for etype, obj in w:  # ends when timeoutSeconds is over
        seen.append((etype, obj["metadata"].get("name")))
    w.close()
    got = [s for s in seen if s[0] != "BOOKMARK"]
    assert got == [("ADDED", "web"), ("DELETED", "web")]
    assert seen[-1][0] == "BOOKMARK"


def test_server_expired_continue_token_is_410(api):
    c = KubeClient(api.url, ssl.create_default_context(cafile=api.ca_file), token=api.token)
    first = c.get("/api/v1/pods", {"limit": "1"})
    token = first["metadata"]["continue"]
    api.apply(k.pod("x", "shop", "node1", ["10.244.1.50"]))
    with pytest.raises(ApiError) as e:
        c.get("/api/v1/pods", {"limit": "1", "continue": token})
    assert e.value.status == 410


def test_server_refuses_objects_real_servers_would_not_serve(api):
    bad = k.pod("x", "shop", "node1", ["10.244.1.50"])
    bad["spec"]["nodeNme"] = "typo"
    with pytest.raises(k.SchemaError, match="nodeNme"):
        api.apply(bad)
    bad = k.service("s", "shop", ["10.96.0.99"], {"a": "b"}, [{"port": "eighty"}])
    with pytest.raises(k.SchemaError, match="eighty"):
        api.apply(bad)


def test_server_needs_the_token(api):
    c = KubeClient(api.url, ssl.create_default_context(cafile=api.ca_file), token="nope")
    with pytest.raises(ApiError) as e:
        c.get("/api/v1/pods")
    assert e.value.status == 401


# --- configuration ----------------------------------------------------------------------


def test_in_cluster_config(api, tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(api.token + "\n")
    (sa / "ca.crt").write_bytes(api.ca_pem)
    c = KubeClient.in_cluster({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)},
                              str(sa))
    assert c.server == api.url
    assert len(c.get("/api/v1/nodes")["items"]) == 2
    (sa / "token").write_text("rotated")  # bound tokens rotate: read on every request
    with pytest.raises(ApiError, match="401"):
        c.get("/api/v1/nodes")
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST is not set"):
        KubeClient.in_cluster({}, str(sa))
    with pytest.raises(KubeConfigError, match="token is missing"):
        KubeClient.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, str(tmp_path))


@pytest.mark.parametrize("doc,msg", [
    ("{}", "no current-context"),
    ("current-context: x\ncontexts: []\n", "no context named 'x'"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://h'}}]\n"
     "users: [{name: u, user: {exec: {command: aws}}}]\n", "exec/auth-provider plugin"),
    ("- a\n", "not a mapping"),
])
def test_kubeconfig_errors(tmp_path, doc, msg):
    p = tmp_path / "kc"
    p.write_text(doc)
    with pytest.raises(KubeConfigError, match=msg):
        KubeClient.from_kubeconfig(str(p))


def test_source_from_config_builds_the_kubernetes_source(api, tmp_path):
    api.kubeconfig(str(tmp_path / "kc"))
    cfg = parse_config(
        "node: node1\ncgroup: x\nproxy: {redirectIPv4: 10.244.1.1}\n"
        "identity: {bundle: b, caCert: c, caKey: k}\n"
        "workloads: {source: kubernetes, kubeconfig: kc}\n",
        str(tmp_path / "config.yaml"),
    )
    src = source_from_config(cfg)
    assert isinstance(src, KubernetesSource) and src.where == api.url and src.node == "node1"


def test_repeated_410_relists_then_backs_off_and_converges(api, make_source):
    src = make_source()
    src.start()
    pods = src.reflectors["Pod"]
    lists = pods.counts["lists"]
    api.fail(410, 3, path="/api/v1/pods", watch=True)
    api.restart()  # the pods' watch reconnects into three 410s in a row
    until(lambda: not api.faults and pods.connected, "the 410s consumed and the watch open again")
    assert pods.counts["lists"] >= lists + 3  # a relist after each
    api.apply(k.pod("api", "shop", "node1", ["10.244.1.11"]))
    next_inventory(src, lambda i: "shop/api" in keys(i), "the pod after the 410s")


def test_server_validates_status_and_events(api):
    with pytest.raises(k.SchemaError):
        k.validate({"kind": "Status", "apiVersion": "v1", "metadata": {}, "code": "410"})
    with pytest.raises(k.SchemaError):
        api.inject("pods", "ERROR", {"kind": "Status", "apiVersion": "v1", "code": "not a number"})
