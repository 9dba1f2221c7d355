"""An API gateway in the mesh, end to end: a real nginx gateway in front of
two mesh services on a 2-node simulated cluster, with the example set
policies/gateway/ (HTTPRoute + mesh policies) as the configuration.

    node1: gateway (ingress, sa gateway: nginx rendered from
           policies/gateway/routes/shop.yaml), orders-1 (shop, app=orders:
           tests/support/podhttpd.py, logs every header), outside (namespace
           "outside", not enrolled: the external client)
    node2: frontend-1 (shop, app=frontend: nginx, /orders/* passed on to the
           orders Service with every header, the rest answered itself),
           debug (shop, enrolled: a pod that is not the gateway)

outside -> gateway pod address -> (mesh) frontend VIP -> (mesh) orders VIP:
both mesh hops cross nodes.  The policies are the example files, applied with
the CLI; the RequestAuthentication is the example's, turned into its
meshlet.io form with jwksFile pointing at keys made here.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from tests.support.privileged import policy_cli, require_privileged, running_mesh, wait_for, wait_policies_enforced

require_privileged()

import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from jwt.algorithms import ECAlgorithm  # noqa: E402

from agent.policy.gatewaylint import parse_gateway  # noqa: E402
from agent.policy.load import read_sources  # noqa: E402
from agent.sim import Cluster  # noqa: E402
from agent.sim.gateway import Location, access_log, locations_from_routes, start_nginx  # noqa: E402
from agent.sim.mesh import service, service_vip  # noqa: E402

pytestmark = pytest.mark.privileged

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "policies" / "gateway"
PORT = 8080
ISS = "https://login.example"
GATEWAY_ID = "spiffe://cluster.local/ns/ingress/sa/gateway"
FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
PODS = {
    "node1": [
        {"name": "gateway", "namespace": "ingress", "labels": {"app": "gateway"},
         "service_account": "gateway"},
        {"name": "orders-1", "namespace": "shop", "labels": {"app": "orders"},
         "service_account": "orders"},
        {"name": "outside", "namespace": "outside", "labels": {"app": "client"}},
    ],
    "node2": [
        {"name": "frontend-1", "namespace": "shop", "labels": {"app": "frontend"},
         "service_account": "frontend"},
        {"name": "debug", "namespace": "shop", "labels": {"app": "debug"}},
    ],
}
HTTP = [{"port": 80, "targetPort": PORT, "appProtocol": "http"}]
SERVICES = [
    service("frontend", {"app": "frontend"}, HTTP, index=1, namespace="shop"),
    service("orders", {"app": "orders"}, HTTP, index=2, namespace="shop"),
]

# One request per argv JSON {"host", "port", "path", "headers"}: prints
# {"status", "headers", "body"}, or {"error"} if the connection failed.
CLIENT = r"""
import http.client, json, sys
spec = json.loads(sys.argv[1])
try:
    c = http.client.HTTPConnection(spec["host"], spec["port"], timeout=spec.get("timeout", 10))
    c.putrequest("GET", spec["path"], skip_accept_encoding=True)
    for k, v in spec["headers"]:
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    print(json.dumps({"status": r.status, "headers": [[k.lower(), v] for k, v in r.getheaders()],
                      "body": r.read().decode("latin-1")}))
except OSError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def _jwks(key) -> str:
    pub = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    pub["kid"] = "k1"
    return json.dumps({"keys": [pub]})


def mesh_policies(work: pathlib.Path, jwks_file: pathlib.Path) -> pathlib.Path:
    """The example's mesh files in ``work/mesh``, its RequestAuthentication in
    the meshlet.io form (the same rules, the keys from ``jwks_file``)."""
    out = work / "mesh"
    out.mkdir()
    for f in sorted(EXAMPLES.glob("*.yaml")):
        text = f.read_text()
        if "kind: RequestAuthentication" in text:
            lines = []
            for line in text.splitlines():
                if line.startswith("apiVersion: security.istio.io/v1"):
                    line = "apiVersion: meshlet.io/v1alpha1"
                elif line.strip().startswith("jwks: "):
                    line = line[: line.index("jwks: ")] + f"jwksFile: {jwks_file}"
                lines.append(line)
            new = "\n".join(lines) + "\n"
            assert "meshlet.io/v1alpha1" in new and f"jwksFile: {jwks_file}" in new, new
            text = new
        (out / f.name).write_text(text)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("gateway")
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_file = work / "jwks.json"
    jwks_file.write_text(_jwks(key))
    orders_log = str(work / "orders-1.jsonl")
    cluster = Cluster(nodes=2, pods_per_node=0, pod_specs=PODS)
    # shop is strict (plaintext from outside the mesh is dropped at the pods'
    # veths); ingress is permissive: the gateway takes the external client's
    # plaintext, as a LoadBalancer would hand it over
    with running_mesh(cluster, unmeshed={"outside"}, services=SERVICES,
                      namespaces={"shop": {"mode": "strict"}}) as mesh:
        p = cluster.pod("orders-1").popen(
            [sys.executable, "-m", "tests.support.podhttpd", "--name", "orders-1", "--port", str(PORT),
             "--log", orders_log, "--max-seconds", "600"],
            stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        )
        assert "listening" in p.stdout.readline()
        vips = {(s["namespace"], s["name"], s["ports"][0]["port"]): s["vip"][0] for s in SERVICES}
        routes = read_sources([EXAMPLES / "routes"], parse_gateway)
        gw_dir, fe_dir = str(work / "nginx-gateway"), str(work / "nginx-frontend")
        start_nginx(cluster.pod("gateway"), gw_dir, PORT,
                    locations_from_routes(routes, lambda ns, n, port: f"{vips[(ns, n, port)]}:{port}"))
        start_nginx(cluster.pod("frontend-1"), fe_dir, PORT, [
            Location("/orders", upstreams=(f"{service_vip(2)}:80",)),
            Location("/", body="frontend home\n"),
        ])
        docs = mesh_policies(work, jwks_file)
        for node in mesh.agents:
            r = policy_cli(mesh, node, "apply", "-f", str(docs))
            assert r.returncode == 0, r.stdout + r.stderr
            assert "requestauthentication istio-system/end-users created" in r.stdout.lower(), r.stdout
        wait_policies_enforced(mesh)
        yield {"mesh": mesh, "key": key, "orders_log": orders_log, "gw_dir": gw_dir, "fe_dir": fe_dir}


def token(env, key=None, **claims) -> str:
    now = time.time()
    body = {"iss": ISS, "sub": "alice", "aud": "shop", "exp": now + 300, "iat": now, "scope": "orders"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key or env["key"], algorithm="ES256", headers={"kid": "k1"})


def call(env, path: str, headers=(), *, src: str = "outside", host: str | None = None, port: int = PORT,
         timeout: float = 10) -> dict:
    """A GET from ``src`` (default: the external client, to the gateway pod's address)."""
    cluster = env["mesh"].cluster
    spec = {"host": host or cluster.pod("gateway").ip4, "port": port, "path": path, "headers": list(headers),
            "timeout": timeout}
    r = cluster.pod(src).run([sys.executable, "-c", CLIENT, json.dumps(spec)], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def orders_saw(env, path: str) -> list[dict]:
    if not os.path.exists(env["orders_log"]):
        return []  # nothing reached orders yet
    with open(env["orders_log"]) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if r["path"] == path]


def inbound(env, node: str, dst_pod: str, path: str) -> list[dict]:
    """The request lines of ``node``'s access log for ``path`` to ``dst_pod`` (namespace/name)."""
    return [
        e for e in env["mesh"].access_log(node)
        if e.get("direction") == "inbound" and e.get("dst_pod") == dst_pod and e.get("path") == path
    ]


def test_valid_token_end_to_end_with_each_hop_s_identity(env):
    path = "/orders/42"
    bearer = f"Bearer {token(env)}"
    r = call(env, path, [("Authorization", bearer), ("X-Jwt-Sub", "mallory")])
    assert r["status"] == 200 and r["body"].startswith("orders-1 GET /orders/42"), r
    (seen,) = orders_saw(env, path)
    headers = seen["headers"]
    # orders' proxy set the claim header from the token; the copies the client
    # (and frontend's proxy, one hop earlier) put on the request were removed
    assert [v for k, v in headers if k == "x-jwt-sub"] == ["alice"], headers
    # forwardOriginalToken: the token went on through frontend to orders
    assert [v for k, v in headers if k == "authorization"] == [bearer]
    # each mesh hop carried the caller's workload identity, checked by policy
    fe = wait_for(lambda: inbound(env, "node2", "shop/frontend-1", path), "frontend's access-log line")
    assert [(e["src_identity"], e["peer_verified"], e["status"]) for e in fe] == [(GATEWAY_ID, True, 200)]
    od = wait_for(lambda: inbound(env, "node1", "shop/orders-1", path), "orders' access-log line")
    assert [(e["src_identity"], e["peer_verified"], e["status"]) for e in od] == [(FRONTEND_ID, True, 200)]


def test_no_token_passes_the_gateway_and_frontend_then_403_at_orders(env):
    r = call(env, "/")
    assert r["status"] == 200 and r["body"] == "frontend home\n", r
    r = call(env, "/orders/anon")
    assert r["status"] == 403 and r["body"].startswith("RBAC: access denied"), r
    assert not orders_saw(env, "/orders/anon")
    # refused by orders' proxy (authorization policy), the peer being frontend
    od = wait_for(lambda: inbound(env, "node1", "shop/orders-1", "/orders/anon"), "orders' access-log line")
    assert [(e["src_identity"], e["status"], e["response_flags"]) for e in od] == [(FRONTEND_ID, 403, "RBAC")]
    # no ALLOW rule matched (no request principal): denied by no single policy
    assert [(e["verdict"], e["deny_reason"], e["policy"], e["reason"]) for e in od] == \
        [("denied", "policy", None, "no ALLOW policy match")]
    # the 403 came from orders' proxy, through frontend's nginx
    assert any('"GET /orders/anon ' in ln and "upstream_status=403" in ln for ln in access_log(env["fe_dir"]))


def test_token_without_the_claim_403_on_the_second_hop(env):
    r = call(env, "/orders/read-only", [("Authorization", f"Bearer {token(env, scope='read')}")])
    assert r["status"] == 403 and r["body"].startswith("RBAC: access denied"), r
    assert not orders_saw(env, "/orders/read-only")
    od = wait_for(lambda: inbound(env, "node1", "shop/orders-1", "/orders/read-only"), "orders' log line")
    assert [(e["src_identity"], e["status"], e["response_flags"], e["verdict"]) for e in od] == \
        [(FRONTEND_ID, 403, "RBAC", "denied")]
    fe = [ln for ln in access_log(env["fe_dir"]) if '"GET /orders/read-only ' in ln]
    assert fe and "upstream_status=403" in fe[-1], fe  # frontend was reached and passed orders' 403 on
    r = call(env, "/", [("Authorization", f"Bearer {token(env, scope='read')}")])
    assert r["status"] == 200, r  # frontend itself needs no claim


def test_bad_tokens_401_at_the_first_mesh_hop(env):
    good = token(env)
    h, p, s = good.split(".")
    tampered = f"{h}.{p}.{s[:-6]}{'AAAAAA' if s[-6:] != 'AAAAAA' else 'BBBBBB'}"
    other = ec.generate_private_key(ec.SECP256R1())
    for bad in (tampered, token(env, exp=time.time() - 3600), token(env, key=other),
                token(env, iss="https://evil"), token(env, aud="billing")):
        r = call(env, "/", [("Authorization", f"Bearer {bad}")])
        assert r["status"] == 401, (bad, r)
        assert dict(r["headers"]).get("www-authenticate", "").startswith("Bearer"), r
    gw = [ln for ln in access_log(env["gw_dir"]) if '"GET / ' in ln and " 401 " in ln]
    assert gw and all("upstream_status=401" in ln for ln in gw), gw  # not the gateway's own 401


@pytest.mark.parametrize("target", ["vip", "pod"])
def test_a_pod_other_than_the_gateway_cannot_call_frontend(env, target):
    """debug (enrolled, shop) calls frontend directly, with a valid token:
    frontend's policy admits only the gateway's identity."""
    fe = env["mesh"].cluster.pod("frontend-1").ip4
    host, port = (service_vip(1), 80) if target == "vip" else (fe, PORT)
    path = f"/orders/direct-{target}"
    r = call(env, path, [("Authorization", f"Bearer {token(env)}")], src="debug", host=host, port=port)
    assert r.get("status") != 200, r
    assert "error" in r or r["status"] == 403, r  # refused at connect() or by the proxy (RBAC)
    assert not orders_saw(env, path)
    assert not [ln for ln in access_log(env["fe_dir"]) if f"/orders/direct-{target}" in ln]
    # the same request through the gateway goes through
    assert call(env, path, [("Authorization", f"Bearer {token(env)}")])["status"] == 200


def test_the_external_client_reaches_the_mesh_only_through_the_gateway(env):
    """shop is strict: the outside pod's plaintext SYN to frontend's own
    address is dropped at frontend's veth (it never reaches nginx)."""
    fe = env["mesh"].cluster.pod("frontend-1").ip4
    r = call(env, "/orders/around", [("Authorization", f"Bearer {token(env)}")], host=fe, timeout=2)
    assert "error" in r and "timed out" in r["error"], r
    assert not orders_saw(env, "/orders/around")
    assert not [ln for ln in access_log(env["fe_dir"]) if "/orders/around" in ln]
