"""End to end: L7 (HTTP) authorization in the destination node's proxy, on a
real 2-node simulated cluster with ``proxy.l7: true`` and mTLS between nodes.

Workloads (the namespaces and labels of policies/istio-docs/)::

    node1: sleep (foo), tester (bar), stranger (baz), httpbin-1 (foo, app=httpbin)
    node2: httpbin-2 (foo, app=httpbin), tester-2 (bar, service account tester)

httpbin-1/-2 run a recording HTTP/1.1 server on 8000 and 8001: it appends
every byte it reads and every request it parses (as it understands it) to a
JSON-lines file *before* answering.  Assertions are on that record, not only
on what the proxy answers: a request the proxy refuses must never appear in
it.  Each test runs against httpbin-1 (same node as the clients: the Local
route) and httpbin-2 (cross node: the mTLS tunnel, identities verified).

Clients speak raw HTTP/1.1 over plain sockets from inside their pods (curl
would normalize the corpus away), several requests per connection where
the test needs keep-alive.

Policies go through the real CLI (`meshlet policy apply`) to both agents;
each test removes what it applied.  A denial is a 403 with ``RBAC: access
denied``; rules the kernel can decide at connect time (pure L4) may refuse
the connection instead (EPERM), which the tests accept as a denial.
"""

from __future__ import annotations

import json
import os
import pathlib
import posixpath
import subprocess
import sys
import urllib.parse

import pytest

from tests.support.privileged import require_privileged, wait_for, wait_policies_enforced

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

pytestmark = pytest.mark.privileged

DOCS = pathlib.Path(__file__).resolve().parents[2] / "policies" / "istio-docs"
PORT, PORT2 = 8000, 8001
DENIED_BODY = "RBAC: access denied"

PODS = {
    "node1": [
        {"name": "sleep", "namespace": "foo", "labels": {"app": "sleep"}},
        {"name": "tester", "namespace": "bar", "labels": {"app": "tester"}},
        {"name": "stranger", "namespace": "baz", "labels": {"app": "stranger"}},
        {"name": "httpbin-1", "namespace": "foo", "labels": {"app": "httpbin"}, "service_account": "httpbin"},
    ],
    "node2": [
        {"name": "httpbin-2", "namespace": "foo", "labels": {"app": "httpbin"}, "service_account": "httpbin"},
        {"name": "tester-2", "namespace": "bar", "labels": {"app": "tester"}, "service_account": "tester"},
    ],
}
DSTS = [("httpbin-1", "node1"), ("httpbin-2", "node2")]
DST_IDS = ["same-node", "cross-node"]

# A recording HTTP/1.1 backend.  argv: record-file port...
BACKEND = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

record = open(sys.argv[1], "a", buffering=1)
lock = threading.Lock()
conn_ids = iter(range(1, 1 << 30))

def put(**kw):
    with lock:
        record.write(json.dumps(kw) + "\n")

class Tee:
    def __init__(self, f, cid):
        self.f, self.cid = f, cid
    def _rec(self, b):
        if b:
            put(conn=self.cid, raw=b.decode("latin-1"))
        return b
    def readline(self, *a):
        return self._rec(self.f.readline(*a))
    def read(self, *a):
        return self._rec(self.f.read(*a))
    def __getattr__(self, name):
        return getattr(self.f, name)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with lock:
            self.cid = next(conn_ids)
        self.rfile = Tee(self.rfile, self.cid)

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.any
        raise AttributeError(name)

    def any(self):
        body = b""
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(n)
                self.rfile.readline()
        elif self.headers.get("Content-Length"):
            body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = [[k.lower(), v] for k, v in self.headers.items()]
        put(conn=self.cid, port=self.server.server_port, method=self.command, target=self.path,
            routed=servlet_path(self.path), version=self.request_version, headers=headers,
            body=body.decode("latin-1"))
        if self.path.startswith("/upgrade") and self.headers.get("Upgrade"):
            # accept any protocol switch, then (standing in for the new
            # protocol) keep reading requests on the same connection
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.end_headers()
            return
        out = json.dumps({"method": self.command, "target": self.path, "headers": headers,
                          "body": len(body)}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        put(error=repr(sys.exc_info()[1]), peer=client_address[0])

# The resource a servlet container routes a target to (Tomcat's order): path
# parameters (';' to the end of each segment) removed, then one percent-decode,
# merged slashes and dot segments resolved.
def servlet_path(target):
    import posixpath, re, urllib.parse
    path = target.split("?", 1)[0]
    path = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    path = re.sub("/+", "/", urllib.parse.unquote(path))
    out = posixpath.normpath(path)
    return out + "/" if path.endswith("/") and out != "/" else out

for port in sys.argv[2:]:
    srv = Server(("0.0.0.0", int(port)), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print("listening", flush=True)
threading.Event().wait(900)
"""

# A raw HTTP/1.1 client.  stdin: JSON {"host", "port", "conns": [[step, ...], ...]}
# where a step is {"send": latin-1 text, "read": number of responses, "head":
# the responses answer HEAD (no body), "gate": a file to wait for (at most
# 30 s) before sending}.  stdout:
# one JSON result per connection: {"responses": [{status, headers, body}],
# "extra": bytes that came after the expected responses, "closed": bool,
# "error": connect/IO error or null}.
CLIENT = r"""
import json, os, socket, sys, time

spec = json.load(sys.stdin)

def read_response(s, buf, is_head=False):
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            raise EOFError(buf)
        buf += b
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        raise ValueError(head + b"\r\n\r\n" + buf) from None
    headers = [l.split(":", 1) for l in lines[1:]]
    headers = [[k.strip().lower(), v.strip()] for k, v in headers]
    n = 0 if is_head else int(dict(headers).get("content-length", "0"))
    while len(buf) < n:
        b = s.recv(65536)
        if not b:
            raise EOFError(buf)
        buf += b
    return {"status": status, "headers": headers, "body": buf[:n].decode("latin-1")}, buf[n:]

def finish(s, res, buf, deadline):
    # What else comes until EOF or the deadline: bytes after the responses
    # are a finding; EOF or a reset says how the connection ended.
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            if not b:
                res["closed"] = True
                break
            buf += b
    except OSError as e:
        res["error"] = f"io: {e.errno}: {e.strerror}"
    res["extra"] = buf.decode("latin-1")
    s.close()

# Connections are made one after another (the backend sees the requests in
# this order); each one's linger -- at least ``linger`` seconds after its last
# response -- runs at the end, all at once, instead of one after another.
results, lingering = [], []
for steps in spec["conns"]:
    res = {"responses": [], "extra": "", "closed": False, "error": None}
    results.append(res)
    try:
        s = socket.create_connection((spec["host"], spec["port"]), timeout=10)
    except OSError as e:
        res["error"] = f"connect: {e.errno}: {e.strerror}"
        continue
    buf = b""
    try:
        for st in steps:
            if st.get("gate"):
                end = time.monotonic() + 30
                while not os.path.exists(st["gate"]) and time.monotonic() < end:
                    time.sleep(0.01)
            s.sendall(st["send"].encode("latin-1"))
            for _ in range(st.get("read", 1)):
                r, buf = read_response(s, buf, st.get("head", False))
                res["responses"].append(r)
        lingering.append((s, res, buf))
        continue
    except EOFError:
        res["closed"] = True
    except ValueError as e:
        res["error"] = "not a response: " + e.args[0].decode("latin-1")
    except OSError as e:
        res["error"] = f"io: {e.errno}: {e.strerror}"
    res["extra"] = buf.decode("latin-1")
    s.close()
deadline = time.monotonic() + spec.get("linger", 0.3)
for s, res, buf in lingering:
    finish(s, res, buf, deadline)
print(json.dumps(results))
"""


# --------------------------------------------------------------------------
# The cluster


class Backends:
    """The record files of the recording servers, read incrementally."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.offsets: dict[str, int] = {}

    def path(self, pod: str) -> str:
        return os.path.join(self.workdir, f"record-{pod}.jsonl")

    def all(self, pod: str) -> list[dict]:
        try:
            with open(self.path(pod)) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def mark(self, pod: str) -> None:
        try:
            self.offsets[pod] = os.path.getsize(self.path(pod))
        except FileNotFoundError:
            self.offsets[pod] = 0

    def since(self, pod: str) -> list[dict]:
        """Records appended since the last mark (complete lines only)."""
        with open(self.path(pod), "rb") as f:
            f.seek(self.offsets.get(pod, 0))
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def requests_since(self, pod: str) -> list[dict]:
        return [r for r in self.since(pod) if "method" in r]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("l7authz"))
    cluster = Cluster(nodes=2, pods_per_node=0, pod_specs=PODS).up()
    mesh = Mesh(cluster, l7=True)
    backends = Backends(workdir)
    try:
        for name, _node in DSTS:
            p = cluster.pod(name).popen([sys.executable, "-c", BACKEND, backends.path(name),
                                         str(PORT), str(PORT2)], stdout=subprocess.PIPE, text=True)
            assert "listening" in p.stdout.readline(), name
        mesh.start()
        yield mesh, backends
    finally:
        mesh.down()
        cluster.down()


@pytest.fixture
def policies(env, tmp_path):
    """apply(text_or_path): apply through the CLI on both nodes and wait until
    every proxy worker runs the new set; everything is deleted afterwards."""
    mesh, _ = env
    applied: list[tuple[str, str]] = []

    def apply(*docs) -> None:
        files = []
        for i, d in enumerate(docs):
            if isinstance(d, pathlib.Path):
                files.append(str(d))
            else:
                f = tmp_path / f"p{len(applied)}-{i}.yaml"
                f.write_text(d)
                files.append(str(f))
        for node in mesh.agents:
            args = ["apply"]
            for f in files:
                args += ["-f", f]
            r = cli(mesh, node, *args)
            assert r.returncode == 0, r.stdout + r.stderr
        for node in mesh.agents:
            listing = json.loads(cli(mesh, node, "list", "-o", "json").stdout)
            items = listing if isinstance(listing, list) else listing.get("policies", listing.get("items", []))
            for p in items:
                meta = p.get("metadata", p)
                key = (meta["namespace"], meta["name"])
                if key not in applied:
                    applied.append(key)
        wait_policies_enforced(mesh)

    yield apply
    for node in mesh.agents:
        for ns, name in applied:
            cli(mesh, node, "delete", name, "-n", ns)
    wait_policies_enforced(mesh)


def cli(mesh, node: str, *args: str) -> subprocess.CompletedProcess:
    return mesh.policy(node, *args)


def http(env, src: str, dst: str, conns: list, port: int = PORT, linger: float = 0.3) -> list[dict]:
    mesh, _ = env
    spec = {"host": mesh.cluster.pod(dst).ip4, "port": port, "conns": conns, "linger": linger}
    r = mesh.cluster.pod(src).run([sys.executable, "-c", CLIENT], input=json.dumps(spec),
                                  check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def get(target: str, *, method: str = "GET", host: str = "httpbin.foo", headers=(), body: str = "") -> dict:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return {"send": "\r\n".join(lines) + "\r\n\r\n" + body, "read": 1}


def statuses(env, src, dst, *reqs, port: int = PORT) -> list:
    """Each request on its own connection: its status, or "refused" when the
    connection could not be made or was reset (a connect-time denial)."""
    out = []
    for res in http(env, src, dst, [[r] for r in reqs], port=port):
        if res["responses"]:
            out.append(res["responses"][0]["status"])
        else:
            out.append("refused")
    return out


def denied(status) -> bool:
    return status in (403, "refused")


def assert_403(resp: dict) -> None:
    assert resp["status"] == 403, resp
    assert resp["body"] == DENIED_BODY, resp


# --------------------------------------------------------------------------
# Allow and deny by every attribute


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_403_keeps_the_connection_usable_and_never_reaches_the_backend(env, policies, dst, node):
    mesh, rec = env
    assert statuses(env, "sleep", dst, get("/admin")) == [200]   # no policy: allowed
    policies(DOCS / "07-deny-path-prefix.yaml")
    rec.mark(dst)
    (res,) = http(env, "sleep", dst, [[get("/admin/users"), get("/ok?x=1"), get("/admin"), get("/ok2")]])
    assert res["error"] is None and not res["closed"], res
    st = [r["status"] for r in res["responses"]]
    assert st == [403, 200, 403, 200], res
    assert_403(res["responses"][0])
    assert_403(res["responses"][2])
    got = rec.requests_since(dst)
    assert [r["target"] for r in got] == ["/ok?x=1", "/ok2"]
    # only what was allowed reached it, not a byte of the denied requests
    assert "admin" not in "".join(r.get("raw", "") for r in rec.since(dst))
    # the access log names the policy for the denied requests
    denied_lines = [e for e in mesh.access_log(node) if e.get("kind") == "request"
                    and e.get("status") == 403 and e.get("path") == "/admin/users"]
    assert denied_lines and denied_lines[-1].get("policy") == "foo/httpbin-deny-admin", denied_lines[-1:]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_method_path_principal_namespace(env, policies, dst, node):
    policies(DOCS / "06-allow-method-path.yaml")
    _, rec = env
    rec.mark(dst)
    assert statuses(env, "sleep", dst, get("/info"), get("/info/x"), get("/data", method="POST"),
                    get("/info", method="POST"), get("/data", method="DELETE"), get("/data"),
                    get("/INFO")) == [200, 200, 200, 403, 403, 403, 403]
    assert statuses(env, "tester", dst, get("/info/y"), get("/data", method="PUT")) == [200, 403]
    st = statuses(env, "stranger", dst, get("/info"))
    assert denied(st[0]), st
    assert sorted(r["target"] for r in rec.requests_since(dst)) == ["/data", "/info", "/info/x", "/info/y"]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_path_exact_prefix_suffix(env, policies, dst, node):
    policies("""\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: paths, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: [/exact, /pre/*, "*.png"]}}]
""")
    assert statuses(env, "sleep", dst, get("/exact"), get("/exact/"), get("/exactly"), get("/pre/a/b"),
                    get("/pre"), get("/img/x.png"), get("/img/x.png?y"), get("/x.PNG"),
                    get("/a/../exact")) == [200, 403, 403, 200, 403, 200, 200, 403, 200]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_principal_and_namespace(env, policies, dst, node):
    policies(DOCS / "04-allow-by-principal.yaml")
    assert statuses(env, "sleep", dst, get("/a")) == [200]
    for src in ("tester", "tester-2", "stranger"):
        st = statuses(env, src, dst, get("/a"))
        assert denied(st[0]), (src, st)


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_namespace(env, policies, dst, node):
    policies(DOCS / "05-allow-by-namespace.yaml")
    assert statuses(env, "tester", dst, get("/a")) == [200]
    assert statuses(env, "tester-2", dst, get("/a")) == [200]
    for src in ("sleep", "stranger"):
        st = statuses(env, src, dst, get("/a"))
        assert denied(st[0]), (src, st)


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_ip_blocks(env, policies, dst, node):
    policies(DOCS / "09-allow-ip-blocks.yaml")    # node 1's pod range only
    assert statuses(env, "tester", dst, get("/a")) == [200]
    st = statuses(env, "tester-2", dst, get("/a"))   # same identity, node 2's address
    assert denied(st[0]), st


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_port(env, policies, dst, node):
    policies("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-8001, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8001"]}}]
""")
    assert statuses(env, "sleep", dst, get("/a")) == [200]
    st = statuses(env, "sleep", dst, get("/a"), port=PORT2)
    assert denied(st[0]), st


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_host(env, policies, dst, node):
    policies(DOCS / "15-hosts.yaml")
    assert statuses(env, "sleep", dst, get("/a", host="httpbin.foo"), get("/a", host="HTTPBIN.Foo:80"),
                    get("/a", host="x.httpbin.example"), get("/a", host="evil.foo"),
                    get("/a", host="httpbin.foo:8000")) == [200, 200, 200, 403, 403]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_headers_including_repeated(env, policies, dst, node):
    policies(DOCS / "13-header-conditions.yaml")
    tok = lambda *vs: [("X-Token", v) for v in vs]  # noqa: E731
    assert statuses(env, "sleep", dst,
                    get("/ip", headers=tok("admin")), get("/ip", headers=tok("ops-1")),
                    get("/ip"), get("/ip", headers=tok("guest")),
                    get("/ip", headers=tok("guest", "admin")),   # values: any line matches
                    get("/ip", headers=tok("guest", "other")),
                    get("/ip", headers=tok("guest, admin")),     # one line, one value
                    get("/other", headers=tok("admin"))) == [200, 200, 403, 403, 200, 403, 403, 403]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_default_semantics(env, policies, dst, node):
    # only a DENY policy: what it does not match is allowed
    policies(DOCS / "07-deny-path-prefix.yaml")
    assert statuses(env, "stranger", dst, get("/a"), get("/admin")) == [200, 403]
    # an ALLOW policy that matches nothing: everything is denied
    policies(DOCS / "01-allow-nothing.yaml")
    st = statuses(env, "sleep", dst, get("/a"))
    assert denied(st[0]), st
    # an ALLOW policy that matches: allowed again, and DENY still wins
    policies(DOCS / "03-allow-all.yaml")
    assert statuses(env, "sleep", dst, get("/a"), get("/admin/x")) == [200, 403]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_audit_logs_without_blocking(env, policies, dst, node):
    mesh, rec = env
    policies(DOCS / "12-audit.yaml")
    rec.mark(dst)
    assert statuses(env, "sleep", dst, get("/user-profile/42"), get("/other")) == [200, 200]
    assert [r["target"] for r in rec.requests_since(dst)] == ["/user-profile/42", "/other"]

    def logged():
        text = mesh.proxy_log(node)
        return [ln for ln in text.splitlines()
                if "audit" in ln and "/user-profile/42" in ln and "foo/httpbin-audit-profiles" in ln]
    wait_for(logged, "the AUDIT match in the proxy log", timeout=10)
    assert not [ln for ln in mesh.proxy_log(node).splitlines()
                if "audit" in ln and "/other" in ln and "httpbin-audit-profiles" in ln]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_reload_decides_the_next_request_on_a_live_connection(env, policies, dst, node, tmp_path):
    mesh, rec = env
    gate = tmp_path / "gate"
    spec = {"host": mesh.cluster.pod(dst).ip4, "port": PORT, "linger": 0.3,
            "conns": [[get("/live"), dict(get("/live"), gate=str(gate)), get("/other")]]}
    rec.mark(dst)
    client = mesh.cluster.pod("sleep").popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True)
    try:
        client.stdin.write(json.dumps(spec))
        client.stdin.close()
        wait_for(lambda: [r for r in rec.requests_since(dst) if r["target"] == "/live"],
                 "the first request to arrive", timeout=15)
        policies("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-live, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/live]}}]
""")
        gate.touch()
        client.wait(timeout=60)   # the client's own bounds: 30 s gate, 10 s per socket read
        out = client.stdout.read()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    (res,) = json.loads(out)
    assert [r["status"] for r in res["responses"]] == [200, 403, 200], res
    assert [r["target"] for r in rec.requests_since(dst)] == ["/live", "/other"]


# --------------------------------------------------------------------------
# The normalization and smuggling corpus


def _req(line: str, *headers: str, body: str = "") -> str:
    return "\r\n".join([line, *headers]) + "\r\n\r\n" + body


H = "Host: httpbin.foo"
RESET: list = []   # no response: the connection was refused or reset
SMUGGLED = "GET /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n"
INNER = "GET /smuggled HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n"

# (id, raw bytes, expected statuses in order, targets the backend may receive,
#  whether admin bytes may legitimately reach the backend inside a body)
CORPUS = [
    ("plain", _req("GET /admin HTTP/1.1", H), [403], [], False),
    ("trailing-slash", _req("GET /admin/ HTTP/1.1", H), [403], [], False),
    ("sub-path", _req("GET /admin/x HTTP/1.1", H), [403], [], False),
    ("double-slash", _req("GET //admin HTTP/1.1", H), [403], [], False),
    ("dot-segment", _req("GET /./admin HTTP/1.1", H), [403], [], False),
    ("dot-dot", _req("GET /foo/../admin HTTP/1.1", H), [403], [], False),
    ("dot-dot-above-root", _req("GET /../admin HTTP/1.1", H), [403], [], False),
    ("escaped-dots", _req("GET /%2e%2E/admin HTTP/1.1", H), [403], [], False),
    ("escaped-unreserved", _req("GET /%61dmin HTTP/1.1", H), [403], [], False),
    ("escaped-upper", _req("GET /%41dmin HTTP/1.1", H), [200], ["/Admin"], False),  # = /Admin, case-sensitive
    ("query", _req("GET /admin?q=1 HTTP/1.1", H), [403], [], False),
    # path parameters, which servlet-style backends strip: refused by default (proxy.pathParameters)
    ("path-param", _req("GET /admin;x=1 HTTP/1.1", H), [400], [], False),
    ("path-param-empty", _req("GET /admin; HTTP/1.1", H), [400], [], False),
    ("path-param-slash", _req("GET /admin;/ HTTP/1.1", H), [400], [], False),
    ("path-param-sub", _req("GET /admin;x=y/users HTTP/1.1", H), [400], [], False),
    ("path-param-earlier", _req("GET /ad;x=y/../admin HTTP/1.1", H), [400], [], False),
    ("path-param-on-ok", _req("GET /ok;jsessionid=1 HTTP/1.1", H), [400], [], False),
    ("escaped-semicolon", _req("GET /admin%3Bx HTTP/1.1", H), [400], [], False),
    ("semicolon-in-query", _req("GET /ok?a;b HTTP/1.1", H), [200], ["/ok?a;b"], False),
    ("servlet-dotdot", _req("GET /public/..;/admin HTTP/1.1", H), [400], [], False),
    ("escaped-slash", _req("GET /admin%2F HTTP/1.1", H), [400], [], False),
    ("escaped-slash-traversal", _req("GET /x%2F..%2Fadmin HTTP/1.1", H), [400], [], False),
    ("escaped-backslash", _req("GET /admin%5C HTTP/1.1", H), [400], [], False),
    ("backslash", _req("GET /admin\\ HTTP/1.1", H), [400], [], False),
    ("backslash-traversal", _req("GET /x\\..\\admin HTTP/1.1", H), [400], [], False),
    ("fragment", _req("GET /admin#frag HTTP/1.1", H), [400], [], False),
    ("fragment-hides", _req("GET /ok#/../admin HTTP/1.1", H), [400], [], False),
    ("escaped-nul", _req("GET /admin%00 HTTP/1.1", H), [400], [], False),
    # not HTTP/1.x to the sniffer: served as TCP, where the DENY rule (its
    # path dropped, Istio's TCP semantics) refuses the whole connection
    ("raw-nul", _req("GET /admin\x00 HTTP/1.1", H), RESET, [], False),
    ("escaped-crlf", _req("GET /admin%0d%0a HTTP/1.1", H), [400], [], False),
    ("raw-control", _req("GET /ad\x01min HTTP/1.1", H), RESET, [], False),
    ("raw-tab", _req("GET /ad\tmin HTTP/1.1", H), RESET, [], False),
    ("overlong-utf8", _req("GET /%c0%ae%c0%ae/admin HTTP/1.1", H), [400], [], False),
    ("absolute-form", _req("GET http://httpbin.foo/admin HTTP/1.1", H), [400], [], False),
    ("absolute-form-ok-path", _req("GET http://httpbin.foo/ok HTTP/1.1", H), [400], [], False),
    ("upper-case", _req("GET /ADMIN HTTP/1.1", H), [200], ["/ADMIN"], False),
    ("mixed-case", _req("GET /Admin HTTP/1.1", H), [200], ["/Admin"], False),
    ("double-escape", _req("GET /%2561dmin HTTP/1.1", H), [200], ["/%2561dmin"], False),
    ("lower-case-method", _req("get /admin HTTP/1.1", H), [400], [], False),
    ("same-host-twice", _req("GET /admin HTTP/1.1", H, H), [400], [], False),
    ("http10-no-host", _req("GET /admin HTTP/1.0"), [403], [], False),
    ("upgrade-denied-path", _req("GET /admin HTTP/1.1", H, "Connection: Upgrade", "Upgrade: websocket",
                                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"),
     [403], [], False),
    ("expect-continue", _req("POST /admin HTTP/1.1", H, "Content-Length: 3", "Expect: 100-continue"),
     [403], [], False),
    # framing: every ambiguous message is refused before anything is forwarded
    ("cl-and-te", _req("POST /ok HTTP/1.1", H, "Content-Length: 6", "Transfer-Encoding: chunked",
                       body="0\r\n\r\n" + SMUGGLED), [400], [], False),
    ("te-and-cl", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding: chunked", "Content-Length: 6",
                       body="0\r\n\r\n" + SMUGGLED), [400], [], False),
    ("duplicate-differing-cl", _req("POST /ok HTTP/1.1", H, "Content-Length: 0",
                                    f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED), [400], [], False),
    ("cl-list", _req("POST /ok HTTP/1.1", H, f"Content-Length: 0, {len(SMUGGLED)}", body=SMUGGLED),
     [400], [], False),
    ("te-chunked-identity", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding: chunked, identity",
                                 body="0\r\n\r\n" + SMUGGLED), [400], [], False),
    ("te-identity", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding: identity", body=SMUGGLED),
     [400], [], False),
    ("te-vertical-tab", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding:\x0bchunked",
                             body="0\r\n\r\n" + SMUGGLED), [400], [], False),
    ("te-space-before-colon", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding : chunked",
                                   body="0\r\n\r\n" + SMUGGLED), [400], [], False),
    ("te-in-http10", _req("POST /ok HTTP/1.0", H, "Transfer-Encoding: chunked",
                          body="0\r\n\r\n" + SMUGGLED), [400], [], False),
    ("duplicate-host", _req("GET /ok HTTP/1.1", H, "Host: other"), [400], [], False),
    ("missing-host", _req("GET /admin HTTP/1.1"), [400], [], False),
    ("obs-fold", _req("GET /ok HTTP/1.1", H, "X-A: 1", " Transfer-Encoding: chunked",
                      f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED), [400], [], False),
    ("too-many-headers", _req("GET /admin HTTP/1.1", H, *[f"X-{i}: v" for i in range(120)]),
     [431], [], False),
    ("oversized-header", _req("GET /admin HTTP/1.1", H, "X-Big: " + "a" * (70 * 1024)), [431], [], False),
    ("bad-chunk-size", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding: chunked",
                            body="zz\r\n" + SMUGGLED), [400], [], False),
    ("bare-lf", "GET /admin HTTP/1.1\nHost: httpbin.foo\n\n", [400], [], False),
    ("http2-version", _req("GET /admin HTTP/2.0", H), RESET, [], False),
    # the HTTP/2 preface is served as HTTP/2 now (h2c, prior knowledge): no HTTP/1.1
    # answer and nothing forwarded (its requests are decided per stream: test_grpc.py)
    ("h2-preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [], [], False),
    # pipelining: the second request is parsed, and decided, by the proxy
    ("pipelined", _req("POST /ok HTTP/1.1", H, "Content-Length: 0") + SMUGGLED, [200, 403], ["/ok"], False),
    ("after-last-chunk", _req("POST /ok HTTP/1.1", H, "Transfer-Encoding: chunked",
                              body="0\r\n\r\n" + SMUGGLED), [200, 403], ["/ok"], False),
    ("h2c-upgrade", _req("GET /ok HTTP/1.1", H, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                         "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA") + SMUGGLED, [200, 403], ["/ok"], False),
    # a denied request's body is discarded, never parsed as a request
    ("denied-with-body", _req("POST /admin HTTP/1.1", H, f"Content-Length: {len(INNER)}", body=INNER),
     [403], [], False),
    ("denied-chunked-then-allowed", _req("POST /admin/x HTTP/1.1", H, "Transfer-Encoding: chunked",
                                         body=f"{len(INNER):x}\r\n{INNER}\r\n0\r\n\r\n")
     + _req("GET /ok HTTP/1.1", H), [403, 200], ["/ok"], False),
    # what is matched is what is forwarded
    ("forwarded-normalized", _req("GET /x/./../ok//y/%7Ez?q=%41&r=1 HTTP/1.1", H), [200], ["/ok/y/~z?q=%41&r=1"],
     False),
    # a request inside a correctly framed body is data, for the proxy and the backend
    ("in-body", _req("POST /ok HTTP/1.1", H, f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED),
     [200], ["/ok"], True),
]


def _admin_resource(target: str) -> bool:
    """Would a lenient backend take ``target`` for /admin?  (one decode,
    dot segments, repeated and back slashes, path parameters; query and
    fragment dropped; case-sensitive, as the policy is)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    path = urllib.parse.unquote(path).replace("\\", "/")
    path = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    path = posixpath.normpath("/" + path.lstrip("/"))
    return path == "/admin" or path.startswith("/admin/")


DENY_ADMIN = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: corpus-deny-admin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_normalization_and_smuggling_corpus(env, policies, dst, node):
    _, rec = env
    policies(DENY_ADMIN)
    rec.mark(dst)
    before_all = len(rec.all(dst))
    # An entry that wants no response reads none (it would wait out the socket
    # timeout for one); what comes back anyway is in its "extra".
    results = http(env, "sleep", dst, [[{"send": raw, "read": 1 if want is RESET else len(want)}]
                                       for _, raw, want, _, _ in CORPUS])
    problems = []
    for (name, _raw, want, fwd, _body_ok), res in zip(CORPUS, results):
        got = [r["status"] for r in res["responses"]]
        if want is RESET and not (res["closed"] or (res["error"] or "").startswith(("io: 104", "connect:"))):
            problems.append(f"{name}: neither refused nor reset: {res}")
        if got != want:
            problems.append(f"{name}: statuses {got} (want {want}); error {res['error']}; "
                            f"extra {res['extra'][:80]!r}")
        if name == "h2-preface":
            # served as HTTP/2: whatever comes (the proxy waits for the client's
            # SETTINGS before its own) is no HTTP/1.1 answer
            if res["extra"].startswith("HTTP/"):
                problems.append(f"{name}: answered as HTTP/1.1: {res['extra'][:80]!r}")
        elif res["extra"]:
            problems.append(f"{name}: unexpected bytes after the responses: {res['extra'][:80]!r}")
        for r in res["responses"]:
            if r["status"] == 403 and r["body"] != DENIED_BODY:
                problems.append(f"{name}: 403 body {r['body']!r}")
            if r["status"] in (400, 431, 505) and ["connection", "close"] not in r["headers"]:
                problems.append(f"{name}: {r['status']} without Connection: close")
    # What the backend received, connection by connection (each corpus entry
    # used its own client connection, so its own upstream connection unless
    # pooled: compare the whole sequence of parsed requests in order).
    got_requests = rec.requests_since(dst)
    want_targets = [t for _, _, _, fwd, _ in CORPUS for t in fwd]
    if [r["target"] for r in got_requests] != want_targets:
        problems.append(f"backend received {[r['target'] for r in got_requests]}, want {want_targets}")
    for r in got_requests:
        if _admin_resource(r["target"]):
            problems.append(f"backend received a request for the admin resource: {r['target']!r}")
    # A body that turns out malformed after its head was streamed upstream
    # (bad-chunk-size) leaves the backend an incomplete request and a reset,
    # never a complete one; nothing else may break the backend's parsing.
    errors = [r for r in rec.since(dst) if "error" in r]
    if len(errors) > 1:
        problems.append(f"backend errors: {errors}")
    raw = "".join(r.get("raw", "") for r in rec.since(dst))
    body_ok = sum(1 for c in CORPUS if c[4])
    assert raw.count("/admin") == body_ok * SMUGGLED.count("/admin"), raw  # only inside the in-body body
    assert len(rec.all(dst)) > before_all
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_h2c_upgrade_cannot_smuggle_requests_past_policy(env, policies, dst, node):
    _, rec = env
    policies(DENY_ADMIN)
    rec.mark(dst)
    up = _req("GET /upgrade HTTP/1.1", H, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
              "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA")
    (res,) = http(env, "sleep", dst, [[{"send": up, "read": 1}, {"send": SMUGGLED, "read": 1}]])
    targets = [r["target"] for r in rec.requests_since(dst)]
    assert not [t for t in targets if _admin_resource(t)], targets
    assert [r["status"] for r in res["responses"]] == [200, 403], res


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_websocket_upgrade_is_authorized_on_its_handshake(env, policies, dst, node):
    """After a 101 the connection is a byte stream (as in every HTTP proxy):
    policy decides the upgrade request itself."""
    _, rec = env
    policies(DENY_ADMIN)
    ws = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
          "Sec-WebSocket-Version: 13")
    rec.mark(dst)
    (denied_, allowed_) = http(env, "sleep", dst, [[{"send": _req("GET /admin/upgrade HTTP/1.1", H, *ws)}],
                                                  [{"send": _req("GET /upgrade/ws HTTP/1.1", H, *ws)}]])
    assert [r["status"] for r in denied_["responses"]] == [403], denied_
    assert [r["status"] for r in allowed_["responses"]] == [101], allowed_
    assert [r["target"] for r in rec.requests_since(dst)] == ["/upgrade/ws"]


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_denied_head_request_has_no_body(env, policies, dst, node):
    _, rec = env
    policies(DENY_ADMIN)
    rec.mark(dst)
    (res,) = http(env, "sleep", dst, [[{"send": _req("HEAD /admin HTTP/1.1", H), "read": 1, "head": True},
                                       get("/ok")]])
    assert rec.requests_since(dst) == [] or [r["target"] for r in rec.requests_since(dst)] == ["/ok"]
    assert [r["status"] for r in res["responses"]] == [403, 200], res
    assert res["extra"] == "", res


def test_admin_resource_helper_sees_through_the_tricks():
    for t in ("/admin", "//admin/", "/x/../admin", "/%61dmin", "/admin;x", "/admin?q", "\\admin",
              "/admin%2F", "http://h/admin"):
        assert _admin_resource(t), t
    for t in ("/ADMIN", "/Admin", "/ok", "/%2561dmin", "/administrator"):
        assert not _admin_resource(t), t


# --------------------------------------------------------------------------
# Path parameters against a servlet-style backend (issue #12 item 9)

DENY_ADMIN_EXACT = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin-exact, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
"""
# What a servlet container routes each to: /admin or /admin/... — the resource the rule denies.
PARAM_VARIANTS = ["/admin;x=y", "/admin;", "/admin;/", "/admin;x=y/", "/admin;x=y/users",
                  "/admin/;x/users", "/ad;x=y/../admin", "/a;b/../admin;c"]


def _servlet_admin(routed: str) -> bool:
    return routed == "/admin" or routed.startswith("/admin/")


@pytest.fixture
def path_parameters(env):
    """set(mode): proxy.pathParameters on both nodes (the agents restart and
    the running proxies take the new state); the default comes back after."""
    mesh, _ = env

    def set_mode(mode: str) -> None:
        mesh.reconfigure(path_parameters=mode)

    yield set_mode
    if mesh.path_parameters != "reject":
        mesh.reconfigure(path_parameters="reject")


@pytest.mark.parametrize("dst,node", DSTS, ids=DST_IDS)
def test_path_parameters_cannot_bypass_an_exact_deny(env, policies, path_parameters, dst, node):
    mesh, rec = env
    policies(DENY_ADMIN_EXACT)
    reqs = [get(v) for v in PARAM_VARIANTS]

    # keep (the old forwarding): the servlet backend strips the parameters and
    # serves /admin: this is the bypass, and the proof the backend strips them
    path_parameters("keep")
    rec.mark(dst)
    got = statuses(env, "sleep", dst, get("/admin;x=y"))
    assert got == [200], got
    assert [r["routed"] for r in rec.requests_since(dst)] == ["/admin"]

    # reject (the default): every variant is a 400, nothing reaches the backend
    path_parameters("reject")
    rec.mark(dst)
    got = statuses(env, "sleep", dst, *reqs, get("/admin"), get("/ok"))
    assert got == [400] * len(PARAM_VARIANTS) + [403, 200], got
    assert [r["routed"] for r in rec.requests_since(dst)] == ["/ok"]

    # strip: policy sees (and denies) what the servlet would route; allowed
    # paths reach the backend without their parameters
    path_parameters("strip")
    rec.mark(dst)
    got = statuses(env, "sleep", dst, *reqs, get("/ok;jsessionid=1"), get("/ok%3Bx"))
    assert got == [403] * len(PARAM_VARIANTS) + [200, 200], got
    received = rec.requests_since(dst)
    assert [r["target"] for r in received] == ["/ok", "/ok%3Bx"], received
    assert not [r for r in received if _servlet_admin(r["routed"])]
