"""End-user JWT authentication end to end: a real 2-node simulated cluster
(mTLS between nodes), ``proxy.l7`` left at ``auto``: the RequestAuthentication
alone makes the destination proxy serve the backend as HTTP.

    node1: client (shop, app=client), orders-1 (shop, app=orders)
    node2: orders-2 (shop, app=orders)

orders-1/-2 run tests/support/podhttpd.py, which logs every header line it
received.  A RequestAuthentication (meshlet.io, keys in a JWKS file the
destination proxy reads) and an AuthorizationPolicy (the request principal
of that issuer with claim ``scope: orders``, or paths under /public/) go
through the real CLI to both agents.  Each check runs against orders-1
(same node: the Local route) and orders-2 (cross node: the tunnel).
Tokens are signed here with keys made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.privileged import policy_cli, require_privileged, running_mesh, wait_for, wait_policies_enforced

require_privileged()

import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from jwt.algorithms import ECAlgorithm  # noqa: E402

from agent.sim import Cluster  # noqa: E402

pytestmark = pytest.mark.privileged

PORT = 8080
ISS = "https://login.example"
PODS = {
    "node1": [
        {"name": "client", "namespace": "shop", "labels": {"app": "client"}},
        {"name": "orders-1", "namespace": "shop", "labels": {"app": "orders"}, "service_account": "orders"},
    ],
    "node2": [
        {"name": "orders-2", "namespace": "shop", "labels": {"app": "orders"}, "service_account": "orders"},
    ],
}
DSTS = ["orders-1", "orders-2"]

AUTHN = """\
apiVersion: meshlet.io/v1alpha1
kind: RequestAuthentication
metadata: {name: login, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  jwtRules:
  - issuer: https://login.example
    audiences: [orders]
    jwksFile: JWKS_FILE
    outputClaimToHeaders:
    - {header: x-jwt-sub, claim: sub}
"""
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from: [{source: {requestPrincipals: ["https://login.example/*"]}}]
    when: [{key: "request.auth.claims[scope]", values: [orders]}]
  - to: [{operation: {paths: ["/public/*"]}}]
"""

# One request per argv JSON {"host", "port", "path", "headers"}: prints
# {"status", "headers", "body"}.
CLIENT = r"""
import http.client, json, sys
spec = json.loads(sys.argv[1])
c = http.client.HTTPConnection(spec["host"], spec["port"], timeout=10)
c.putrequest("GET", spec["path"], skip_accept_encoding=True)
for k, v in spec["headers"]:
    c.putheader(k, v)
c.endheaders()
r = c.getresponse()
print(json.dumps({"status": r.status, "headers": [[k.lower(), v] for k, v in r.getheaders()],
                  "body": r.read().decode("latin-1")}))
"""


def _jwks(key) -> str:
    pub = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    pub["kid"] = "k1"
    return json.dumps({"keys": [pub]})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("jwt")
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_file = work / "jwks.json"
    jwks_file.write_text(_jwks(key))
    logs = {name: str(work / f"{name}.jsonl") for name in DSTS}
    with running_mesh(Cluster(nodes=2, pods_per_node=0, pod_specs=PODS)) as mesh:
        for name in DSTS:
            p = mesh.cluster.pod(name).popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.podhttpd",
                    "--name",
                    name,
                    "--port",
                    str(PORT),
                    "--log",
                    logs[name],
                    "--max-seconds",
                    "600",
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=os.getcwd(),
            )
            assert "listening" in p.stdout.readline(), name
        docs = work / "jwt.yaml"
        docs.write_text(AUTHN.replace("JWKS_FILE", str(jwks_file)) + "---\n" + POLICY)
        for node in mesh.agents:
            r = policy_cli(mesh, node, "apply", "-f", str(docs))
            assert r.returncode == 0, r.stdout + r.stderr
            assert "requestauthentication shop/login created" in r.stdout.lower(), r.stdout
        wait_policies_enforced(mesh)
        yield {"mesh": mesh, "key": key, "jwks_file": jwks_file, "logs": logs}


def token(env, key=None, **claims) -> str:
    now = time.time()
    body = {"iss": ISS, "sub": "alice", "aud": "orders", "exp": now + 300, "iat": now, "scope": "orders"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key or env["key"], algorithm="ES256", headers={"kid": "k1"})


def call(env, dst: str, path: str, headers=()) -> dict:
    mesh = env["mesh"]
    spec = {"host": mesh.cluster.pod(dst).ip4, "port": PORT, "path": path, "headers": list(headers)}
    r = mesh.cluster.pod("client").run(
        [sys.executable, "-c", CLIENT, json.dumps(spec)], check=False, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def last_request(env, dst: str, path: str) -> dict:
    with open(env["logs"][dst]) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    got = [r for r in recs if r["path"] == path]
    assert got, recs[-3:]
    return got[-1]


@pytest.mark.parametrize("dst", DSTS, ids=["same-node", "cross-node"])
def test_valid_token_200_principal_and_claim_header(env, dst):
    path = f"/orders/{dst}/ok"
    r = call(env, dst, path, [("Authorization", f"Bearer {token(env)}"), ("X-Jwt-Sub", "mallory")])
    assert r["status"] == 200, r
    seen = last_request(env, dst, path)["headers"]
    assert [v for k, v in seen if k == "x-jwt-sub"] == [
        "alice"
    ]  # set by the proxy; the client's copy removed
    assert not [k for k, _ in seen if k == "authorization"]  # the token is not forwarded


@pytest.mark.parametrize("dst", DSTS, ids=["same-node", "cross-node"])
def test_no_token_is_judged_by_policy(env, dst):
    r = call(env, dst, "/orders/x")
    assert r["status"] == 403 and r["body"].startswith("RBAC: access denied"), r
    # a path that needs no principal is allowed without a token; an injected claim header never arrives
    path = f"/public/{dst}"
    r = call(env, dst, path, [("X-Jwt-Sub", "mallory")])
    assert r["status"] == 200, r
    assert not [k for k, _ in last_request(env, dst, path)["headers"] if k == "x-jwt-sub"]
    # a valid token without the claim: authenticated, then denied by policy
    r = call(env, dst, "/orders/x", [("Authorization", f"Bearer {token(env, scope='read')}")])
    assert r["status"] == 403, r


@pytest.mark.parametrize("dst", DSTS, ids=["same-node", "cross-node"])
def test_bad_tokens_401(env, dst):
    good = token(env)
    h, p, s = good.split(".")
    tampered = f"{h}.{p}.{s[:-6]}{'AAAAAA' if s[-6:] != 'AAAAAA' else 'BBBBBB'}"
    other = ec.generate_private_key(ec.SECP256R1())
    for bad in (
        tampered,
        token(env, exp=time.time() - 3600),
        token(env, key=other),
        token(env, iss="https://evil"),
    ):
        r = call(env, dst, "/public/x", [("Authorization", f"Bearer {bad}")])
        assert r["status"] == 401, (bad, r)
        assert dict(r["headers"]).get("www-authenticate", "").startswith("Bearer"), r


def test_jwks_file_rotation_reloads(env):
    new = ec.generate_private_key(ec.SECP256R1())
    tok = token(env, key=new)
    assert call(env, "orders-2", "/public/r", [("Authorization", f"Bearer {tok}")])["status"] == 401
    tmp = str(env["jwks_file"]) + ".tmp"
    with open(tmp, "w") as f:
        f.write(_jwks(new))
    os.replace(tmp, env["jwks_file"])
    try:
        wait_for(
            lambda: call(env, "orders-2", "/public/r", [("Authorization", f"Bearer {tok}")])["status"] == 200,
            "the proxy to reload the JWKS file",
            timeout=20,
            interval=0.3,
        )
        # the old key is gone with the old file
        old = token(env)
        assert call(env, "orders-2", "/public/r", [("Authorization", f"Bearer {old}")])["status"] == 401
    finally:
        env["jwks_file"].write_text(_jwks(env["key"]))
