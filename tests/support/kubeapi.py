"""A local Kubernetes API server for tests, speaking the real wire protocol.

No kube-apiserver can be installed on these machines (DESIGN.md), and
PyPI's ``kmock`` does not model what an informer depends on: its list
answers ``resourceVersion: "..."``, its watch ignores ``resourceVersion``
(it replays every object as ADDED), and it has no bookmarks, no 410 Gone,
no ``timeoutSeconds`` and no selectors.  So this server does, over real
HTTP(S) on 127.0.0.1:

* ``GET /api/v1/<resource>`` and ``/apis/<group>/<version>/<resource>``
  (and the ``/namespaces/<ns>/`` forms): JSON lists with
  ``metadata.resourceVersion``, ``limit`` + ``continue`` pages (an expired
  continue token is 410), ``labelSelector`` (``=``, ``==``, ``!=``, ``in``,
  ``notin``, exists, ``!``) and ``fieldSelector`` (``metadata.name``,
  ``metadata.namespace``, ``spec.nodeName``, ``status.phase``; ``=``,
  ``==``, ``!=``);
* ``?watch=true``: a chunked stream of ``{"type", "object"}`` lines from
  the given ``resourceVersion`` (history kept until :meth:`compact`; older
  is an ERROR event with a 410 Status, as the real server sends it, or an
  HTTP 410 with ``gone_as="status"``), ADDED/MODIFIED/DELETED with selector
  transitions (an object leaving a selector is DELETED for that watch),
  BOOKMARK events when ``allowWatchBookmarks`` is set (every
  ``bookmark_interval`` seconds and before the watch ends), and the end of
  the stream after ``timeoutSeconds``;
* single objects: ``GET``/``PUT``/``PATCH`` (JSON merge patch)/``DELETE``
  of ``.../<resource>/<name>``, ``POST`` to a collection (``generateName``,
  409 AlreadyExists), optimistic concurrency (a stale
  ``metadata.resourceVersion`` on PUT is 409 Conflict), ``metadata.generation``
  bumped when the spec changes, and the ``status`` subresource (writes to the
  object keep its status; writes to ``/status`` change only the status) plus
  a CertificateSigningRequest's ``/approval``;
* meshlet's CRDs (objects validated against ``deploy/crds``; a write that
  fails the schema is 422 Invalid), Istio's ``security.istio.io/v1``
  AuthorizationPolicy when :attr:`FakeKubeAPI.istio` says its CRD is
  installed (else 404, as a cluster without Istio answers), and
  ``certificates.k8s.io/v1`` CertificateSigningRequests whose
  ``spec.username``/``groups``/``extra``/``uid`` the server fills in from the
  requester, as the real one does (a client cannot claim another identity),
  and ``coordination.k8s.io/v1`` Leases (leader election: a PUT without
  ``metadata.resourceVersion`` is 422, a stale one 409 Conflict);
* bearer-token auth (401 Status otherwise) with one user per token
  (:meth:`FakeKubeAPI.add_user`: username, groups, extra, and optionally the
  (verb, resource) pairs it may use, else 403 Forbidden), TLS with a CA of its own;
* fault injection: queued error answers (429 with Retry-After, 5xx),
  watches that hang (headers sent, then silence), raw events (duplicates,
  out of order), stopping and restarting on the same port.

Every object stored or injected, every Status answer and every watch event
(its meta/v1 WatchEvent envelope, an ERROR's Status) is validated against
the official Kubernetes OpenAPI schema (``kubernetes-validate``'s bundled,
strict JSON schemas for ``k8s_version``), so the fake cannot serve what a
real API server would not.
"""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import ipaddress
import json
import os
import re
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jsonschema
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

from agent.workloads.kubeclient import ClosingSSLSocket

#: resource (``<plural>`` in the core group, else ``<group>/<plural>``) ->
#: (kind, apiVersion, namespaced)
RESOURCES = {
    "pods": ("Pod", "v1", True),
    "nodes": ("Node", "v1", False),
    "namespaces": ("Namespace", "v1", False),
    "services": ("Service", "v1", True),
    "discovery.k8s.io/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1", True),
    "certificates.k8s.io/certificatesigningrequests": (
        "CertificateSigningRequest", "certificates.k8s.io/v1", False,
    ),
    "meshlet.io/authorizationpolicies": ("AuthorizationPolicy", "meshlet.io/v1alpha1", True),
    "meshlet.io/trafficpolicies": ("TrafficPolicy", "meshlet.io/v1alpha1", True),
    "meshlet.io/requestauthentications": ("RequestAuthentication", "meshlet.io/v1alpha1", True),
    "security.istio.io/authorizationpolicies": ("AuthorizationPolicy", "security.istio.io/v1", True),
    "security.istio.io/requestauthentications": ("RequestAuthentication", "security.istio.io/v1", True),
    "coordination.k8s.io/leases": ("Lease", "coordination.k8s.io/v1", True),
}
#: resources whose PUT must carry ``metadata.resourceVersion`` (the real
#: server's ``AllowUnconditionalUpdate() == false``: a Lease is only ever
#: written from the version read, else 422 Invalid)
CONDITIONAL_UPDATE = {"coordination.k8s.io/leases"}
#: resources whose ``status`` is a subresource (writes to the object keep it)
STATUS_SUBRESOURCE = {
    "certificates.k8s.io/certificatesigningrequests",
    "meshlet.io/authorizationpolicies",
    "meshlet.io/trafficpolicies",
    "meshlet.io/requestauthentications",
    "security.istio.io/authorizationpolicies",
    "security.istio.io/requestauthentications",
}
CUSTOM_GROUPS = ("meshlet.io", "security.istio.io")


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def resource_key(api_version: str, kind: str) -> str:
    """The :data:`RESOURCES` key of objects of ``kind`` in ``api_version``'s group."""
    group = group_of(api_version)
    for res, (k, av, _) in RESOURCES.items():
        if k == kind and group_of(av) == group:
            return res
    raise KeyError(f"{api_version} {kind}: not served by the test API server")
DEFAULT_VERSION = "1.35.0"


class SchemaError(ValueError):
    """An object the real API server would not serve."""


@functools.lru_cache(maxsize=None)
def _validator(kind: str, api_version: str, version: str):
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return _validator_file(f"{kind.lower()}-{group}.json", version)


@functools.lru_cache(maxsize=None)
def _validator_file(name: str, version: str):
    d = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{d}/{name}", version)
    defs = kv.schema_contents(f"{d}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate(obj: dict, version: str = DEFAULT_VERSION) -> None:
    """Raise SchemaError unless ``obj`` validates against the official schema
    (``Status`` objects against meta/v1 Status; meshlet's kinds against its
    CRDs; Istio's AuthorizationPolicy against the shape every object has, as
    its CRD preserves unknown fields)."""
    group = group_of(obj.get("apiVersion", ""))
    if group in CUSTOM_GROUPS:
        _validate_custom(obj, group)
        return
    if obj.get("kind") == "Status":
        v = _validator_file("status-meta-v1.json", version)
    else:
        v = _validator(obj["kind"], obj["apiVersion"], version)
    errors = list(v.iter_errors(obj))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path)
        raise SchemaError(f"{obj['kind']} {obj.get('metadata', {}).get('name')}: {where}: {first.message}")


def _validate_custom(obj: dict, group: str) -> None:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{obj.get('kind')}: metadata.name: required")
    if group == "meshlet.io":
        import jsonschema as js

        from tests.support.kubeschema import validate_cr

        try:
            validate_cr(obj)
        except js.ValidationError as e:
            where = ".".join(str(x) for x in e.absolute_path)
            raise SchemaError(f"{obj['kind']} {name}: {where}: {e.message}") from None
    elif not isinstance(obj.get("spec", {}), dict):
        raise SchemaError(f"{obj['kind']} {name}: spec: must be an object")


# --- object factories (the shapes a real cluster serves) ---------------------------


def namespace(name: str, labels: dict | None = None, annotations: dict | None = None) -> dict:
    meta: dict = {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta, "status": {"phase": "Active"}}


def node(name: str, ipv4: str, ipv6: str | None = None) -> dict:
    addrs = [{"type": "InternalIP", "address": ipv4}]
    if ipv6:
        addrs.append({"type": "InternalIP", "address": ipv6})
    addrs.append({"type": "Hostname", "address": name})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {"addresses": addrs, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def pod(
    name: str,
    ns: str,
    node_name: str,
    ips: list[str] | tuple[str, ...] = (),
    *,
    labels: dict | None = None,
    sa: str = "default",
    phase: str = "Running",
    qos: str = "BestEffort",
    host_network: bool = False,
    uid: str | None = None,
) -> dict:
    spec: dict = {
        "nodeName": node_name,
        "serviceAccountName": sa,
        "containers": [{"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 8080}]}],
    }
    if host_network:
        spec["hostNetwork"] = True
    status: dict = {"phase": phase, "qosClass": qos}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {}), "uid": uid or str(uuid.uuid4())},
        "spec": spec,
        "status": status,
    }


def service(name: str, ns: str, cluster_ips: list[str], selector: dict, ports: list[dict], **spec) -> dict:
    fams = ["IPv4" if ":" not in i else "IPv6" for i in cluster_ips if i != "None"] or ["IPv4"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "ipFamilies": fams,
            "selector": selector,
            "ports": [{"protocol": "TCP", **p} for p in ports],
            **spec,
        },
    }


def endpointslice(name: str, ns: str, svc: str, ports: list[dict], addresses: list[str] = ()) -> dict:
    fam = "IPv6" if addresses and ":" in addresses[0] else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": fam,
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"protocol": "TCP", **p} for p in ports],
    }


# --- selectors ------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(in|notin)\s*\(([^)]*)\)|(==|=|!=)\s*([\w./-]*))?\s*$")


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def label_matcher(sel: str):
    """A predicate over a labels dict; ValueError for a selector it cannot parse."""
    reqs = []
    for part in _split_top(sel):
        m = _SET_RE.match(part)
        if not m:
            raise ValueError(f"unable to parse requirement: {part!r}")
        neg, key, setop, values, op, value = m.groups()
        if neg and (setop or op):
            raise ValueError(f"unable to parse requirement: {part!r}")
        if setop:
            vals = {v.strip() for v in values.split(",") if v.strip()}
            reqs.append(
                (lambda k, vs: lambda lb: lb.get(k) in vs)(key, vals)
                if setop == "in"
                else (lambda k, vs: lambda lb: lb.get(k) not in vs)(key, vals)
            )
        elif op in ("=", "=="):
            reqs.append((lambda k, v: lambda lb: lb.get(k) == v)(key, value))
        elif op == "!=":
            reqs.append((lambda k, v: lambda lb: lb.get(k) != v)(key, value))
        elif neg:
            reqs.append((lambda k: lambda lb: k not in lb)(key))
        else:
            reqs.append((lambda k: lambda lb: k in lb)(key))
    return lambda labels: all(r(labels) for r in reqs)


FIELDS = {
    "metadata.name": lambda o: o["metadata"].get("name"),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
    "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
}


def field_matcher(sel: str, kind: str):
    reqs = []
    for part in [p for p in sel.split(",") if p.strip()]:
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise ValueError(f"invalid field selector: {part!r}")
        path, op, value = m.groups()
        get = FIELDS.get(path)
        if get is None or (kind != "Pod" and path.startswith(("spec.", "status."))):
            raise ValueError(f'field label not supported: {path}')
        reqs.append((lambda g, o, v: (lambda x: (g(x) == v) == (o != "!=")))(get, op, value))
    return lambda obj: all(r(obj) for r in reqs)


# --- the server -----------------------------------------------------------------------


@dataclass
class Fault:
    status: int
    retry_after: int | None = None
    path: str = ""  # only requests whose path starts with this
    watch: bool | None = None  # only watches (True), only lists (False), or both
    method: str | None = None  # only this HTTP method (None: any)


@dataclass
class User:
    """Who a bearer token authenticates as (what the API server writes into
    a CSR's spec), and what it may do: ``allow`` holds ``(verb, resource)``
    pairs (verbs get/list/watch/create/update/patch/delete; resource as in
    :data:`RESOURCES`, ``/<subresource>`` appended) in any namespace (a
    ClusterRole's rule), and ``(verb, resource, namespace, name)``
    quadruples (a Role's rule: only in that namespace; ``name`` "*" for
    any object, else only that one, as ``resourceNames`` does -- a create
    names no object, so a rule with ``resourceNames`` never allows it,
    as in real RBAC), None allows everything."""

    username: str
    groups: tuple[str, ...] = ("system:authenticated",)
    extra: dict[str, list[str]] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    allow: frozenset[tuple[str, ...]] | None = None


@dataclass
class _Event:
    rv: int
    resource: str
    type: str
    obj: dict
    old: dict | None  # the object before, for selector transitions


@dataclass
class FakeKubeAPI:
    """See the module docstring.  ``with FakeKubeAPI() as api:`` starts and stops it."""

    tls: bool = True
    token: str = "meshlet-test-token"
    k8s_version: str = DEFAULT_VERSION
    bookmark_interval: float | None = None
    gone_as: str = "event"  # "event" (ERROR 410 in a 200 stream, as real) or "status" (HTTP 410)
    workdir: str | None = None

    objects: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    rv: int = 100
    oldest: int = 100  # watches from an rv older than this get 410
    faults: list[Fault] = field(default_factory=list)
    hang_watches: bool = False
    netns: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    users: dict[str, User] = field(default_factory=dict)
    istio: bool = False  # whether Istio's AuthorizationPolicy CRD is "installed"

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []
        self._conns: set[socket.socket] = set()
        self.port = 0
        self.closing = False
        if self.tls:
            self._make_certs()

    # --- lifecycle

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> FakeKubeAPI:
        """Serve on 127.0.0.1 (port 0 the first time: any), and on the same
        port in every network namespace of :attr:`netns` (their own loopback)."""
        self.closing = False
        root = _listen(None, self.port)
        self.port = root.getsockname()[1]
        self._serve(root)
        for ns in self.netns:
            self._serve(_listen(ns, self.port))
        return self

    def serve_in(self, netns: str) -> None:
        """Also serve in network namespace ``netns`` (a name under /run/netns
        or a path), now and after every restart."""
        self.netns.append(netns)
        if self._servers:
            self._serve(_listen(netns, self.port))

    def _serve(self, sock: socket.socket) -> None:
        api = self

        class Handler(_Handler):
            server_api = api

        srv = ThreadingHTTPServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        srv.daemon_threads = True
        srv.socket.close()
        srv.socket = sock
        srv.server_address = sock.getsockname()
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_file, self.key_file)
            ctx.sslsocket_class = ClosingSSLSocket  # a client reset before the accept
            srv.socket = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        self._servers.append((srv, t))

    def stop(self) -> None:
        """Stop serving and cut every open connection (the server "dies")."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for srv, _ in self._servers:
            srv.shutdown()
            srv.server_close()
        for s in list(self._conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in self._servers:
            t.join(5)
        self._servers = []

    def restart(self) -> FakeKubeAPI:
        """Stop, then serve again on the same port with the same state."""
        self.stop()
        return self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def kubeconfig(self, path: str, token: str | None = None) -> str:
        """Write a kubeconfig for this server (CA as data, bearer token)."""
        cluster: dict = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "meshlet", "user": {"token": token or self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "meshlet"}}],
            "current-context": "test",
        }
        with open(path, "w") as f:
            json.dump(doc, f)  # JSON is YAML
        return path

    # --- state

    def add_user(self, token: str, username: str, *, groups=("system:authenticated",),
                 extra: dict | None = None, allow=None) -> User:
        """Accept bearer ``token`` as ``username`` (see :class:`User`)."""
        u = User(username, tuple(groups), dict(extra or {}),
                 allow=frozenset(allow) if allow is not None else None)
        self.users[token] = u
        return u

    def user_for(self, authorization: str | None) -> User | None:
        """The user of an ``Authorization`` header, None if unauthenticated.
        :attr:`token` is the cluster admin."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        tok = authorization[len("Bearer "):]
        if tok == self.token:
            return User("kubernetes-admin", ("system:masters", "system:authenticated"))
        return self.users.get(tok)

    def _key(self, obj: dict) -> tuple[str, str, str]:
        res = resource_key(obj["apiVersion"], obj["kind"])
        return res, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    def _record(self, etype: str, obj: dict, old: dict | None) -> None:
        self.history.append(_Event(self.rv, self._key(obj)[0], etype, obj, old))
        self.cond.notify_all()

    def apply(self, obj: dict) -> dict:
        """Create or replace ``obj`` (validated); returns the stored copy."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        with self.cond:
            key = self._key(obj)
            old = self.objects.get(key)
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            if old is not None:
                meta.setdefault("uid", old["metadata"]["uid"])
                meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
            else:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
            if old is None:
                meta.setdefault("generation", 1)
            else:
                gen = old["metadata"].get("generation", 1)
                meta["generation"] = gen + 1 if obj.get("spec") != old.get("spec") else gen
            validate(obj, self.k8s_version)
            self.objects[key] = obj
            self._record("MODIFIED" if old is not None else "ADDED", obj, old)
        return obj

    def apply_many(self, objs) -> None:
        for o in objs:
            self.apply(o)

    def delete(self, kind: str, ns: str, name: str, api_version: str = "") -> dict:
        with self.cond:
            key = (_kind_resource(kind, api_version), ns, name)
            old = self.objects.pop(key)
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", gone, old)
        return gone

    def get(self, kind: str, ns: str, name: str, api_version: str = "") -> dict:
        return copy.deepcopy(self.objects[(_kind_resource(kind, api_version), ns, name)])

    def find(self, kind: str, api_version: str = "") -> list[dict]:
        """Every stored object of ``kind``, in key order."""
        res = _kind_resource(kind, api_version)
        return [copy.deepcopy(o) for (r, _, _), o in sorted(self.objects.items()) if r == res]

    def patch_labels(self, kind: str, ns: str, name: str, labels: dict) -> dict:
        """Set (value) or remove (None) labels, as `kubectl label` does."""
        obj = self.get(kind, ns, name)
        lb = obj["metadata"].setdefault("labels", {})
        for k, v in labels.items():
            if v is None:
                lb.pop(k, None)
            else:
                lb[k] = v
        return self.apply(obj)

    def compact(self) -> None:
        """Forget the history (etcd compaction): watches from before now get 410."""
        with self.cond:
            self.history.clear()
            self.oldest = self.rv

    def inject(self, resource: str, etype: str, obj: dict) -> None:
        """Send a raw event to the watches of ``resource`` as it is, its
        resourceVersion untouched (duplicates and out-of-order events); the
        stored objects do not change."""
        if etype != "BOOKMARK":
            validate(obj, self.k8s_version)
        with self.cond:
            self.rv += 1  # the position in the stream: after what watchers have seen
            self.history.append(_Event(self.rv, resource, etype, copy.deepcopy(obj), None))
            self.cond.notify_all()

    def fail(self, status: int, times: int = 1, *, retry_after: int | None = None, path: str = "",
             watch: bool | None = None, method: str | None = None) -> None:
        """Answer the next ``times`` matching requests with ``status``."""
        with self.cond:
            self.faults.extend(Fault(status, retry_after, path, watch, method) for _ in range(times))

    # --- TLS

    def _make_certs(self) -> None:
        self.workdir = self.workdir or _tempdir()
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kube CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.ca_file = os.path.join(self.workdir, "ca.crt")
        self.cert_file = os.path.join(self.workdir, "apiserver.crt")
        self.key_file = os.path.join(self.workdir, "apiserver.key")
        with open(self.ca_file, "wb") as f:
            f.write(self.ca_pem)
        with open(self.cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key_file, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )


def _listen(netns: str | None, port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port``, made inside network
    namespace ``netns`` (None: this one).  A socket stays in the namespace it
    was made in, so a short-lived thread enters the namespace (setns only
    moves the calling thread), makes it and ends."""
    box: dict = {}

    def make() -> None:
        try:
            if netns is not None:
                import ctypes

                path = netns if netns.startswith("/") else f"/run/netns/{netns}"
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(path, os.O_RDONLY)
                try:
                    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), f"setns {path}")
                finally:
                    os.close(fd)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(64)
            box["sock"] = s
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    if netns is None:
        make()
    else:
        t = threading.Thread(target=make)
        t.start()
        t.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]


def _kind_resource(kind: str, api_version: str) -> str:
    """The resource of ``kind``; ``api_version`` may be left out when only
    one served group has that kind."""
    if api_version:
        return resource_key(api_version, kind)
    found = [r for r, (k, _, _) in RESOURCES.items() if k == kind]
    if len(found) != 1:
        raise KeyError(f"{kind}: give the apiVersion ({', '.join(found) or 'not served'})")
    return found[0]


def _tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="kubeapi-")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_PATH_RE = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<gv>[^/]+))(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[a-z]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?$"
)


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge_patch(target.get(k), v)
    return target


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_api: FakeKubeAPI

    def log_message(self, fmt, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except BaseException:
                # finish() is not called when setup() raises: close the reader
                # made above, or its reference keeps the socket open after the
                # server's close until a collection finds it (ResourceWarning,
                # an error under -W error, in whichever test runs then).
                self.rfile.close()
                raise
            self.request.settimeout(None)
        self.server_api._conns.add(self.request)

    def finish(self) -> None:
        self.server_api._conns.discard(self.request)
        try:
            super().finish()
        except OSError:
            pass

    def _json(self, code: int, doc: dict, headers: dict | None = None) -> None:
        if doc.get("kind") == "Status":
            validate(doc, self.server_api.k8s_version)
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _begin(self, method: str):
        """Authenticate, parse the path, apply injected faults; None when
        this has already answered, else (resource, kind, apiVersion, ns,
        name, subresource, query, user)."""
        api = self.server_api
        u = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
        watch = q.get("watch") in ("true", "1")
        with api.cond:
            api.requests.append((method, u.path, q))
        user = api.user_for(self.headers.get("Authorization"))
        if user is None:
            self._json(401, _status(401, "Unauthorized", "Unauthorized"))
            return None
        m = _PATH_RE.match(u.path)
        res = None
        if m:
            res = f"{m['group']}/{m['res']}" if m["group"] else m["res"]
        if not m or res not in RESOURCES or (res.startswith("security.istio.io/") and not api.istio):
            self._json(404, _status(404, "NotFound", f"the server could not find the requested resource {u.path}"))
            return None
        ns, name, sub = m["ns"], m["name"], m["sub"]
        kind, api_version, namespaced = RESOURCES[res]
        if (
            (m["group"] is not None and f"{m['group']}/{m['gv']}" != api_version)
            or (ns and not namespaced)
            or (sub and not name)
            or (sub and sub not in ("status", "approval"))
            or (sub == "approval" and kind != "CertificateSigningRequest")
        ):
            self._json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return None
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        what = res + (f"/{sub}" if sub else "")
        if user.allow is not None and not (
            {(verb, what), (verb, what, ns or "", "*"), (verb, what, ns or "", name or "")} & user.allow
        ):
            what = f"{res}/{sub}" if sub else res
            self._json(403, _status(403, "Forbidden",
                                    f'{what} is forbidden: User "{user.username}" cannot {verb} resource'))
            return None
        with api.cond:
            for i, f in enumerate(api.faults):
                if (u.path.startswith(f.path) and (f.watch is None or f.watch == watch)
                        and (f.method is None or f.method == method)):
                    del api.faults[i]
                    headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
                    reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                              409: "Conflict"}
                    self._json(f.status, _status(f.status, reason.get(f.status, "Unknown"), "injected"), headers)
                    return None
        return res, kind, api_version, ns, name, sub, q, user

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        begun = self._begin("GET")
        if begun is None:
            return
        res, kind, api_version, ns, name, _sub, q, _user = begun
        api = self.server_api
        if name:
            with api.cond:
                obj = api.objects.get((res, ns or "", name))
            if obj is None:
                self._json(404, _status(404, "NotFound", f'{res} "{name}" not found'))
            else:
                self._json(200, obj)
            return
        try:
            lm = label_matcher(q.get("labelSelector", ""))
            fm = field_matcher(q.get("fieldSelector", ""), kind)
        except ValueError as e:
            self._json(400, _status(400, "BadRequest", str(e)))
            return

        def matches(obj: dict) -> bool:
            return (not ns or obj["metadata"].get("namespace") == ns) and lm(
                obj["metadata"].get("labels") or {}
            ) and fm(obj)

        if q.get("watch") in ("true", "1"):
            self._watch(res, kind, api_version, q, matches)
        else:
            self._list(res, kind, api_version, q, matches)

    # --- writes

    def _body(self) -> dict | None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            doc = json.loads(raw)
        except ValueError as e:
            self._json(400, _status(400, "BadRequest", f"the body is not JSON: {e}"))
            return None
        if not isinstance(doc, dict):
            self._json(400, _status(400, "BadRequest", "the body is not a JSON object"))
            return None
        return doc

    def _store(self, code: int, obj: dict, old: dict | None) -> None:
        """Validate ``obj`` and store it as the new version (422 when invalid)."""
        api = self.server_api
        meta = obj.setdefault("metadata", {})
        with api.cond:
            key = api._key(obj)
            api.rv += 1
            meta["resourceVersion"] = str(api.rv)
            if old is None:
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
                meta["generation"] = 1
            else:
                meta["uid"] = old["metadata"]["uid"]
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
                gen = old["metadata"].get("generation", 1)
                meta["generation"] = gen + 1 if obj.get("spec") != old.get("spec") else gen
            try:
                validate(obj, api.k8s_version)
            except SchemaError as e:
                api.rv -= 1
                self._json(422, _status(422, "Invalid", str(e)))
                return
            api.objects[key] = obj
            api._record("MODIFIED" if old is not None else "ADDED", obj, old)
            out = copy.deepcopy(obj)
        self._json(code, out)

    def do_POST(self) -> None:  # noqa: N802
        begun = self._begin("POST")
        if begun is None:
            return
        res, kind, api_version, ns, name, _sub, _q, user = begun
        if name:
            self._json(405, _status(405, "MethodNotAllowed", "POST goes to a collection"))
            return
        obj = self._body()
        if obj is None:
            return
        if obj.get("kind") != kind or obj.get("apiVersion") != api_version:
            self._json(400, _status(400, "BadRequest",
                                    f"the body is {obj.get('apiVersion')} {obj.get('kind')}, not {api_version} {kind}"))
            return
        meta = obj.setdefault("metadata", {})
        if RESOURCES[res][2]:
            if meta.get("namespace", ns) != ns:
                self._json(400, _status(400, "BadRequest", "the namespace of the body does not match the path"))
                return
            meta["namespace"] = ns
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        for k in ("resourceVersion", "uid", "creationTimestamp", "generation"):
            meta.pop(k, None)
        if res in STATUS_SUBRESOURCE:
            obj.pop("status", None)
        if kind == "CertificateSigningRequest" and isinstance(obj.get("spec"), dict):
            # The API server, not the client, says who asked.
            spec = obj["spec"]
            spec["username"], spec["uid"], spec["groups"] = user.username, user.uid, list(user.groups)
            spec.pop("extra", None)
            if user.extra:
                spec["extra"] = {k: list(v) for k, v in user.extra.items()}
        api = self.server_api
        with api.cond:
            if meta.get("name") and (res, ns or "", meta["name"]) in api.objects:
                self._json(409, _status(409, "AlreadyExists", f'{res} "{meta["name"]}" already exists'))
                return
            self._store(201, obj, None)

    def _existing(self, res: str, ns: str | None, name: str) -> dict | None:
        obj = self.server_api.objects.get((res, ns or "", name))
        if obj is None:
            self._json(404, _status(404, "NotFound", f'{res} "{name}" not found'))
        return obj

    def _write(self, method: str) -> None:
        begun = self._begin(method)
        if begun is None:
            return
        res, kind, api_version, ns, name, sub, _q, _user = begun
        if not name:
            self._json(405, _status(405, "MethodNotAllowed", f"{method} needs an object name"))
            return
        if method == "PATCH" and self.headers.get("Content-Type") != "application/merge-patch+json":
            self._json(415, _status(415, "UnsupportedMediaType",
                                    "only application/merge-patch+json is served here"))
            return
        body = self._body()
        if body is None:
            return
        api = self.server_api
        with api.cond:
            old = self._existing(res, ns, name)
            if old is None:
                return
            if method == "PATCH":
                new = _merge_patch(copy.deepcopy(old), body)
            else:
                new = body
                rv = (body.get("metadata") or {}).get("resourceVersion")
                if rv is None and res in CONDITIONAL_UPDATE:
                    self._json(422, _status(422, "Invalid",
                                            f'{kind}.{group_of(api_version)} "{name}" is invalid: '
                                            "metadata.resourceVersion: Invalid value: 0x0: must be "
                                            "specified for an update"))
                    return
                if rv is not None and rv != old["metadata"]["resourceVersion"]:
                    self._json(409, _status(409, "Conflict",
                                            f'Operation cannot be fulfilled on {res} "{name}": '
                                            "the object has been modified; please apply your changes "
                                            "to the latest version and try again"))
                    return
            if new.get("kind", kind) != kind or new.get("apiVersion", api_version) != api_version:
                self._json(400, _status(400, "BadRequest", "kind or apiVersion does not match the path"))
                return
            if (new.get("metadata") or {}).get("name", name) != name:
                self._json(400, _status(400, "BadRequest", "metadata.name does not match the path"))
                return
            out = copy.deepcopy(old)
            if sub == "status":
                if "status" in new:
                    out["status"] = new["status"]
                else:
                    out.pop("status", None)
            elif sub == "approval":
                out.setdefault("status", {})["conditions"] = (new.get("status") or {}).get("conditions", [])
            else:
                out = copy.deepcopy(new)
                out["kind"], out["apiVersion"] = kind, api_version
                meta = out.setdefault("metadata", {})
                meta["name"] = name
                if RESOURCES[res][2]:
                    meta["namespace"] = ns
                if res in STATUS_SUBRESOURCE:
                    if "status" in old:
                        out["status"] = copy.deepcopy(old["status"])
                    else:
                        out.pop("status", None)
                if kind == "CertificateSigningRequest":
                    # who asked is immutable
                    for k in ("username", "uid", "groups", "extra", "request", "signerName"):
                        if k in old["spec"]:
                            out["spec"][k] = copy.deepcopy(old["spec"][k])
            self._store(200, out, old)

    def do_PUT(self) -> None:  # noqa: N802
        self._write("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._write("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        begun = self._begin("DELETE")
        if begun is None:
            return
        res, _kind, _av, ns, name, sub, _q, _user = begun
        if not name or sub:
            self._json(405, _status(405, "MethodNotAllowed", "DELETE needs an object name"))
            return
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)  # DeleteOptions: accepted, not modelled
        api = self.server_api
        with api.cond:
            old = self._existing(res, ns, name)
            if old is None:
                return
            del api.objects[(res, ns or "", name)]
            api.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(api.rv)
            api._record("DELETED", gone, old)
        self._json(200, gone)

    def _list(self, res, kind, api_version, q, matches) -> None:
        api = self.server_api
        limit = int(q["limit"]) if q.get("limit") else 0
        start = 0
        with api.cond:
            if q.get("continue"):
                try:
                    rv_s, off_s = base64.b64decode(q["continue"]).decode().split(":")
                    rv, start = int(rv_s), int(off_s)
                except ValueError:
                    self._json(400, _status(400, "BadRequest", "invalid continue token"))
                    return
                if rv != api.rv:
                    # Pages are served from one consistent snapshot; when it
                    # has moved on, the real server answers 410 for tokens it
                    # can no longer serve.
                    self._json(410, _status(410, "Expired", "The provided continue parameter is too old"))
                    return
            items = [o for (r, _, _), o in sorted(api.objects.items()) if r == res and matches(o)]
            rv = api.rv
        meta: dict = {"resourceVersion": str(rv)}
        page = items[start : start + limit] if limit else items
        if limit and start + limit < len(items):
            meta["continue"] = base64.b64encode(f"{rv}:{start + limit}".encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        out = []
        for o in page:  # list items carry no kind/apiVersion, as the real server sends them
            o2 = dict(o)
            o2.pop("kind", None)
            o2.pop("apiVersion", None)
            out.append(o2)
        self._json(200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": out})

    def _event(self, ev: dict) -> None:
        """One watch event line; the envelope is a meta/v1 WatchEvent, an
        ERROR event's object a Status."""
        errors = list(_validator_file("watchevent-meta-v1.json", self.server_api.k8s_version).iter_errors(ev))
        if errors:
            raise SchemaError(f"watch event: {errors[0].message}")
        if ev["type"] == "ERROR":
            validate(ev["object"], self.server_api.k8s_version)
        self._chunk(json.dumps(ev).encode() + b"\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, res, kind, api_version, q, matches) -> None:
        api = self.server_api
        rv_q = q.get("resourceVersion", "")
        timeout = float(q.get("timeoutSeconds") or 1800)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        since = int(rv_q) if rv_q.isdigit() else None
        if since is not None and since != 0 and since < api.oldest and api.gone_as == "status":
            self._json(410, _status(410, "Expired", f"too old resource version: {since} ({api.oldest})"))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        end = time.monotonic() + timeout
        try:
            if api.hang_watches:
                # A hung server: headers sent, then silence, whatever
                # timeoutSeconds said, until released or stopped.
                while api.hang_watches and not api.closing:
                    with api.cond:
                        api.cond.wait(0.2)
                return
            if since is not None and since != 0 and since < api.oldest:
                st = _status(410, "Expired", f"too old resource version: {since} ({api.oldest})")
                self._event({"type": "ERROR", "object": st})
                self._chunk(b"")
                return
            with api.cond:
                if since is None or since == 0:  # start from now, with the current state as ADDED
                    pos = len(api.history)
                    first = [o for (r, _, _), o in sorted(api.objects.items()) if r == res and matches(o)]
                    seen = api.rv
                else:
                    pos = next((i for i, e in enumerate(api.history) if e.rv > since), len(api.history))
                    first, seen = [], since
            for o in first:
                self._event({"type": "ADDED", "object": o})
            last_bookmark = time.monotonic()
            while not api.closing:
                with api.cond:
                    now = time.monotonic()
                    if now >= end:
                        break
                    wait = end - now
                    if bookmarks and api.bookmark_interval:
                        wait = min(wait, max(0.0, last_bookmark + api.bookmark_interval - now))
                    if pos >= len(api.history):
                        api.cond.wait(wait)
                    batch = api.history[pos:]
                    pos = len(api.history)
                    current = api.rv
                for e in batch:
                    if e.resource != res:
                        continue
                    ev = _for_watch(e, matches)
                    if ev is not None:
                        self._event(ev)
                    seen = max(seen, e.rv)
                if bookmarks and api.bookmark_interval and time.monotonic() - last_bookmark >= api.bookmark_interval:
                    self._event(_bookmark(kind, api_version, current))
                    last_bookmark = time.monotonic()
            if bookmarks and not api.closing:
                self._event(_bookmark(kind, api_version, api.rv))
            self._chunk(b"")
        except OSError:
            pass  # the client went away, or stop() cut the connection
        finally:
            self.close_connection = True


def _for_watch(e: _Event, matches) -> dict | None:
    """The event as a watcher with a selector sees it (objects moving in or
    out of the selector are ADDED or DELETED for it)."""
    if e.type == "ERROR" or e.type == "BOOKMARK":
        return {"type": e.type, "object": e.obj}
    now = matches(e.obj)
    before = matches(e.old) if e.old is not None else None
    if e.type == "MODIFIED" and before is not None and before != now:
        return {"type": "ADDED" if now else "DELETED", "object": e.obj}
    if e.type == "DELETED":
        return {"type": "DELETED", "object": e.obj} if (before if before is not None else now) else None
    return {"type": e.type, "object": e.obj} if now else None


def _bookmark(kind: str, api_version: str, rv: int) -> dict:
    return {
        "type": "BOOKMARK",
        "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(rv)}},
    }
