"""The client's writes (create, replace, merge patch, delete) against the
test API server, and the server's write semantics the CA controller and the
policy watcher rely on: status subresources, generation, optimistic
concurrency, CSRs stamped with the requester, RBAC refusals."""

from __future__ import annotations

import gc
import select
import socket
import struct
import threading
import warnings

import pytest

from agent.workloads.kubeclient import ApiError, KubeClient
from tests.support import kubeapi as k

AP = "/apis/meshlet.io/v1alpha1/namespaces/shop/authorizationpolicies"
CSRS = "/apis/certificates.k8s.io/v1/certificatesigningrequests"


def _policy(name: str = "deny-admin", path: str = "/admin") -> dict:
    return {
        "apiVersion": "meshlet.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": [path]}}]}]},
    }


@pytest.fixture
def api(tmp_path):
    with k.FakeKubeAPI(workdir=str(tmp_path)) as srv:
        yield srv


def _client(api: k.FakeKubeAPI, tmp_path, token: str | None = None) -> KubeClient:
    return KubeClient.from_kubeconfig(api.kubeconfig(str(tmp_path / "kc.yaml"), token=token))


def test_create_get_replace_delete(api, tmp_path):
    c = _client(api, tmp_path)
    made = c.create(AP, _policy())
    assert made["metadata"]["generation"] == 1 and made["metadata"]["uid"]
    with pytest.raises(ApiError) as e:
        c.create(AP, _policy())
    assert e.value.status == 409 and e.value.reason == "AlreadyExists"
    got = c.get(f"{AP}/deny-admin")
    assert got["spec"]["rules"][0]["to"][0]["operation"]["paths"] == ["/admin"]

    got["spec"]["rules"][0]["to"][0]["operation"]["paths"] = ["/admin/*"]
    new = c.replace(f"{AP}/deny-admin", got)
    assert new["metadata"]["generation"] == 2
    # the same write again, from the stale version: a conflict
    with pytest.raises(ApiError) as e:
        c.replace(f"{AP}/deny-admin", got)
    assert e.value.status == 409 and e.value.reason == "Conflict"

    c.delete(f"{AP}/deny-admin")
    with pytest.raises(ApiError) as e:
        c.get(f"{AP}/deny-admin")
    assert e.value.status == 404


def test_status_is_a_subresource(api, tmp_path):
    c = _client(api, tmp_path)
    made = c.create(AP, {**_policy(), "status": {"conditions": []}})
    assert "status" not in made  # status is ignored on create
    cond = {"type": "Accepted", "status": "True", "reason": "Loaded", "message": "ok",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    st = c.merge_patch(f"{AP}/deny-admin/status", {"status": {"conditions": [cond]}})
    assert st["status"]["conditions"] == [cond]
    assert st["metadata"]["generation"] == 1  # a status write is not a new generation
    # a spec write keeps the status and bumps the generation
    spec2 = c.merge_patch(f"{AP}/deny-admin", {"spec": {"action": "AUDIT"}, "status": {"conditions": []}})
    assert spec2["status"]["conditions"] == [cond] and spec2["metadata"]["generation"] == 2
    # a write to /status changes nothing else
    st2 = c.merge_patch(f"{AP}/deny-admin/status", {"spec": {"action": "ALLOW"}, "status": {"conditions": []}})
    assert st2["spec"]["action"] == "AUDIT" and st2["status"]["conditions"] == []


def test_a_write_the_crd_schema_refuses_is_422(api, tmp_path):
    c = _client(api, tmp_path)
    bad = _policy()
    bad["spec"]["action"] = ["not", "a", "string"]
    with pytest.raises(ApiError) as e:
        c.create(AP, bad)
    assert e.value.status == 422 and e.value.reason == "Invalid"
    assert api.find("AuthorizationPolicy", "meshlet.io/v1alpha1") == []


def test_istio_kind_served_only_with_its_crd(api, tmp_path):
    c = _client(api, tmp_path)
    path = "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies"
    with pytest.raises(ApiError) as e:
        c.get(path)
    assert e.value.status == 404
    api.istio = True
    assert c.get(path)["items"] == []


def test_csr_is_stamped_with_the_requester(api, tmp_path):
    api.add_user(
        "node-a-token",
        "system:serviceaccount:meshlet-system:meshlet-node",
        groups=("system:serviceaccounts", "system:authenticated"),
        extra={"authentication.kubernetes.io/node-name": ["node-a"]},
        allow={("create", "certificates.k8s.io/certificatesigningrequests"),
               ("get", "certificates.k8s.io/certificatesigningrequests")},
    )
    c = _client(api, tmp_path, token="node-a-token")
    csr = {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"generateName": "meshlet-node-"},
        "spec": {
            "request": "LS0tLS1CRUdJTg==",
            "signerName": "meshlet.io/node-intermediate",
            "usages": ["cert sign"],
            # a client cannot claim to be someone else
            "username": "system:admin",
            "extra": {"authentication.kubernetes.io/node-name": ["node-b"]},
        },
    }
    made = c.create(CSRS, csr)
    spec = made["spec"]
    assert made["metadata"]["name"].startswith("meshlet-node-")
    assert spec["username"] == "system:serviceaccount:meshlet-system:meshlet-node"
    assert spec["extra"] == {"authentication.kubernetes.io/node-name": ["node-a"]}
    # RBAC: the node may create and read its CSR, not approve it
    name = made["metadata"]["name"]
    assert c.get(f"{CSRS}/{name}")["spec"]["signerName"] == "meshlet.io/node-intermediate"
    approval = {**made, "status": {"conditions": [{"type": "Approved", "status": "True", "reason": "x"}]}}
    with pytest.raises(ApiError) as e:
        c.replace(f"{CSRS}/{name}/approval", approval)
    assert e.value.status == 403
    # the admin may; /approval changes only the conditions
    admin = _client(api, tmp_path)
    approval["spec"] = {**approval["spec"], "username": "system:admin"}
    out = admin.replace(f"{CSRS}/{name}/approval", approval)
    assert out["status"]["conditions"][0]["type"] == "Approved"
    assert out["spec"]["username"] == "system:serviceaccount:meshlet-system:meshlet-node"


def test_unknown_token_is_401_and_merge_patch_needs_its_media_type(api, tmp_path):
    with pytest.raises(ApiError) as e:
        _client(api, tmp_path, token="nobody").get(AP)
    assert e.value.status == 401
    c = _client(api, tmp_path)
    c.create(AP, _policy())
    with pytest.raises(ApiError) as e:
        c.request("PATCH", f"{AP}/deny-admin", {"spec": {}})  # application/json: refused
    assert e.value.status == 415


def test_writes_reach_watchers(api, tmp_path):
    c = _client(api, tmp_path)
    rv = c.get(AP)["metadata"]["resourceVersion"]
    c.create(AP, _policy())
    c.merge_patch(f"{AP}/deny-admin", {"spec": {"action": "AUDIT"}})
    c.delete(f"{AP}/deny-admin")
    w = c.watch(AP, {"resourceVersion": rv, "timeoutSeconds": "1"}, read_timeout=5)
    try:
        events = [(t, o["spec"]["action"]) for t, o in w]
    finally:
        w.close()
    assert events == [("ADDED", "DENY"), ("MODIFIED", "AUDIT"), ("DELETED", "AUDIT")]


@pytest.mark.parametrize("close", [True, False])
def test_an_answer_cut_short_is_an_error_and_leaves_no_socket_open(close):
    # An API server (or a proxy in front of it) that dies mid-answer: the
    # request is an ApiError naming the cut, and the client's socket is
    # closed at once, not left to the garbage collector (a ResourceWarning
    # in the agent's log, an error in the test suite).  With and without
    # "Connection: close" (http.client hands the socket to the response
    # when the answer says it will close).
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    head += b"Connection: close\r\n\r\n" if close else b"\r\n"
    ls = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = ls.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(head + b'{"kind": ')

    t = threading.Thread(target=serve)
    t.start()
    try:
        client = KubeClient(f"http://127.0.0.1:{ls.getsockname()[1]}")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(ApiError) as e:
                client.get("/api/v1/pods", timeout=10)
            gc.collect()
        assert "GET /api/v1/pods" in str(e.value)
        assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]
    finally:
        t.join(10)
        ls.close()


def test_a_tls_connection_the_server_reset_first_is_closed_not_left_to_the_collector(api, tmp_path):
    # The server resets the TCP connection before the client wraps it in
    # TLS (a restarting API server, a load balancer cutting it): wrapping
    # fails in SSLSocket's creation, and the half-made socket must be
    # closed there, not by a later garbage collection (a ResourceWarning).
    client = _client(api, tmp_path)
    ls = socket.create_server(("127.0.0.1", 0))
    with ls:
        sock = socket.create_connection(ls.getsockname())
        conn, _ = ls.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    select.select([sock], [], [], 10)  # the RST has arrived
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(ConnectionResetError):
            client.ssl_context.wrap_socket(sock, server_hostname="127.0.0.1")
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]
