"""A small Kubernetes API client over the standard library: GET a list
(JSON), stream a watch (one JSON event per line, chunked), and the few
writes meshlet makes (create a CSR, patch a policy's status, write policy
objects for ``meshlet policy`` in Kubernetes mode), with bearer
tokens or client certificates over TLS, configured in-cluster (service
account token, CA, ``KUBERNETES_SERVICE_HOST``) or from a kubeconfig.

Why not lightkube or kubernetes-asyncio (README, "Why these libraries"):
the informer semantics are the point of :mod:`agent.workloads.kubernetes`
(list, then watch from the list's resourceVersion; on 410 *relist*, not
just re-watch; read timeouts that catch a hung watch; Retry-After on 429)
and both libraries hide the parts needed: lightkube's watch answers a 410
by watching again from "now" without a relist (objects deleted meanwhile
would be kept forever) and decodes every object into full models, the
memory a node agent that caches every pod of the cluster cannot spend.
What is left is a handful of requests, done here in ~300 lines.

Errors are :class:`ApiError` (an OSError, as the workload source contract
asks for "cannot reach"), carrying the HTTP status and Retry-After.
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import os
import socket
import ssl
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import yaml

__all__ = ["ApiError", "ClosingSSLSocket", "KubeConfigError", "KubeClient", "Watch"]

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ApiError(OSError):
    """A failed request: ``status`` 0 for a transport error (refused, reset,
    timeout, TLS), else the HTTP status."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.reason = reason

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class KubeConfigError(ValueError):
    """The client cannot be configured; the message says from what and why."""


class ClosingSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that closes itself when its own creation fails.

    Wrapping a TCP socket whose peer reset it first (an API server that
    restarts, a load balancer that cuts idle connections) fails inside
    ``SSLSocket``'s creation, in its probe ``recv``; Python 3.11 leaves that
    half-made socket open, unreachable, until a garbage collection closes
    it with a ResourceWarning.  The same holds for a server's accepted
    socket (the test API server uses this class too)."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except OSError as e:
            # Still being created (no SSL object yet), and not the ENOTCONN /
            # EINVAL that the probe of a listening socket expects.
            if getattr(self, "_sslobj", None) is None and e.errno not in (errno.ENOTCONN, errno.EINVAL):
                self.close()
            raise


@dataclass
class KubeClient:
    """Requests to one API server."""

    server: str
    """``https://host:port`` (or ``http://`` for a local proxy)."""
    ssl_context: ssl.SSLContext | None = None
    token: str | None = None
    token_file: str | None = None
    """Re-read on every request: bound service account tokens rotate."""

    def __post_init__(self) -> None:
        u = urllib.parse.urlsplit(self.server)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise KubeConfigError(f"API server {self.server!r} is not an http(s) URL")
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._base = u.path.rstrip("/")
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = ClosingSSLSocket

    # --- configuration --------------------------------------------------------------

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] | None = None, sa_dir: str = SA_DIR) -> KubeClient:
        """The pod's own service account, as every in-cluster client does."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError(
                "not in a cluster: KUBERNETES_SERVICE_HOST is not set; set workloads.kubeconfig "
                "in the agent config to run outside a pod"
            )
        token_file, ca = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
        for f in (token_file, ca):
            if not os.path.exists(f):
                raise KubeConfigError(
                    f"in-cluster config: {f} is missing; is the service account token mounted?"
                )
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", ssl.create_default_context(cafile=ca), token_file=token_file)

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> KubeClient:
        """The cluster and user of ``context`` (default: current-context) in a
        kubeconfig file: server, CA (file or data), insecure-skip-tls-verify,
        bearer token (or tokenFile), client certificate and key (file or data)."""
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise KubeConfigError(f"kubeconfig {path} is not YAML: {e}") from e
        if not isinstance(doc, dict):
            raise KubeConfigError(f"kubeconfig {path}: not a mapping")
        base = os.path.dirname(os.path.abspath(path))

        def named(section: str, name: str) -> dict:
            for e in doc.get(section) or ():
                if isinstance(e, dict) and e.get("name") == name:
                    return e.get(section[:-1]) or {}
            raise KubeConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r} in {section}")

        ctx_name = context or doc.get("current-context")
        if not ctx_name:
            raise KubeConfigError(f"kubeconfig {path}: no current-context; pass workloads.context")
        ctx = named("contexts", ctx_name)
        cluster = named("clusters", ctx.get("cluster", ""))
        user = named("users", ctx["user"]) if ctx.get("user") else {}
        if user.get("exec") or user.get("auth-provider"):
            raise KubeConfigError(
                f"kubeconfig {path}: user {ctx.get('user')!r} uses an exec/auth-provider plugin, "
                "which meshlet does not run; use a token or a client certificate"
            )
        server = cluster.get("server")
        if not server:
            raise KubeConfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")

        def rel(p: str) -> str:
            return p if os.path.isabs(p) else os.path.join(base, p)

        ctx_ssl = None
        if server.startswith("https:"):
            if cluster.get("insecure-skip-tls-verify"):
                ctx_ssl = ssl.create_default_context()
                ctx_ssl.check_hostname = False
                ctx_ssl.verify_mode = ssl.CERT_NONE
            elif cluster.get("certificate-authority-data"):
                ctx_ssl = ssl.create_default_context(
                    cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
                )
            elif cluster.get("certificate-authority"):
                ctx_ssl = ssl.create_default_context(cafile=rel(cluster["certificate-authority"]))
            else:
                ctx_ssl = ssl.create_default_context()
            cert, key = user.get("client-certificate-data"), user.get("client-key-data")
            if cert and key:
                _load_chain_data(ctx_ssl, base64.b64decode(cert), base64.b64decode(key))
            elif user.get("client-certificate") and user.get("client-key"):
                ctx_ssl.load_cert_chain(rel(user["client-certificate"]), rel(user["client-key"]))
        token_file = rel(user["tokenFile"]) if user.get("tokenFile") else None
        return cls(server, ctx_ssl, token=user.get("token"), token_file=token_file)

    # --- requests ---------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "meshlet"}
        token = self.token
        if self.token_file:
            try:
                with open(self.token_file) as f:
                    token = f.read().strip()
            except OSError as e:
                raise ApiError(0, f"cannot read token {self.token_file}: {e.strerror}") from e
        if token:
            h["Authorization"] = f"Bearer {token}"
        return h

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _open(
        self,
        path: str,
        params: Mapping[str, str],
        timeout: float,
        method: str = "GET",
        body: bytes | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200,),
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        target = self._base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type
        conn = self._connection(timeout)
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ApiError(0, f"{method} {path}: {_transport(e)}") from e
        if resp.status not in ok:
            try:
                data = resp.read(65536)
            except (OSError, http.client.HTTPException):
                data = b""
            resp.close()  # its file object holds the socket too
            conn.close()
            raise _status_error(method, path, resp, data)
        return conn, resp

    def get(self, path: str, params: Mapping[str, str] | None = None, timeout: float = 30.0) -> dict:
        """GET ``path`` and decode the JSON body."""
        return self.request("GET", path, params=params, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Mapping | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> dict:
        """One request with an optional JSON ``body``; the decoded JSON answer.
        Any 2xx is success (create answers 201, delete 200 or 202)."""
        data = json.dumps(body).encode() if body is not None else None
        conn, resp = self._open(path, params or {}, timeout, method, data, content_type, ok=(200, 201, 202))
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(0, f"{method} {path}: {_transport(e)}") from e
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ApiError(0, f"{method} {path}: the answer is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ApiError(0, f"{method} {path}: the answer is not a JSON object")
        return doc

    def create(self, path: str, obj: Mapping) -> dict:
        """POST ``obj`` to the collection ``path``; the stored object.
        An existing name is ApiError 409 (reason ``AlreadyExists``)."""
        return self.request("POST", path, obj)

    def replace(self, path: str, obj: Mapping) -> dict:
        """PUT ``obj`` at the object (or subresource) ``path``; 409 (reason
        ``Conflict``) when its ``metadata.resourceVersion`` is stale."""
        return self.request("PUT", path, obj)

    def merge_patch(self, path: str, patch: Mapping) -> dict:
        """A JSON merge patch (RFC 7386) of the object (or subresource) ``path``."""
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path: str) -> dict:
        """DELETE the object ``path``; 404 when it is not there."""
        return self.request("DELETE", path)

    def watch(self, path: str, params: Mapping[str, str], read_timeout: float) -> Watch:
        """Open a watch; iterate the returned :class:`Watch` for events.
        ``read_timeout``: seconds without a byte before the stream counts as hung."""
        conn, resp = self._open(path, {**params, "watch": "true"}, read_timeout)
        return Watch(path, conn, resp)


class Watch:
    """An open watch stream: iterate for ``(type, object)``; :meth:`close`
    from another thread interrupts a blocked read."""

    def __init__(self, path: str, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.path, self._conn, self._resp = path, conn, resp

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        while True:
            try:
                line = self._resp.readline()
            except TimeoutError as e:
                raise ApiError(
                    0, f"watch {self.path}: no data for {self._conn.timeout}s; reconnecting"
                ) from e
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as e:
                # (http.client raises ValueError/AttributeError on a stream cut mid-chunk)
                raise ApiError(0, f"watch {self.path}: {_transport(e)}") from e
            if not line:
                return  # the server ended the watch (timeoutSeconds): watch again
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
                etype, obj = ev["type"], ev["object"]
            except (ValueError, KeyError, TypeError) as e:
                raise ApiError(0, f"watch {self.path}: undecodable event: {line[:200]!r}") from e
            yield etype, obj

    def abort(self) -> None:
        """From another thread: shut the socket down, so a blocked read ends."""
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """From the reading thread, when done."""
        try:
            self._resp.close()  # the response's file object holds the socket too
        except (OSError, http.client.HTTPException, ValueError):
            pass  # a stream cut mid-chunk; the socket is closed below either way
        self._conn.close()


def _transport(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _status_error(method: str, path: str, resp: http.client.HTTPResponse, body: bytes) -> ApiError:
    message, reason = "", ""
    try:
        st = json.loads(body)
        message, reason = str(st.get("message") or ""), str(st.get("reason") or "")
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    retry = None
    ra = resp.getheader("Retry-After")
    if ra is not None:
        try:
            retry = float(ra)
        except ValueError:
            retry = None
    hint = {
        401: "; is the service account token valid?",
        403: "; does the meshlet ClusterRole grant "
        + ("get/list/watch" if method == "GET" else method.lower())
        + " on it?",
    }.get(resp.status, "")
    return ApiError(
        resp.status,
        f"{method} {path}: {resp.status} {resp.reason}" + (f": {message}" if message else "") + hint,
        retry_after=retry,
        reason=reason,
    )


def _load_chain_data(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads client certificates only from files: write them to a
    private temporary file for the call."""
    fd, name = tempfile.mkstemp(prefix="meshlet-kube-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert + b"\n" + key)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)
