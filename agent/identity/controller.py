"""``meshlet ca controller``: approves and signs node intermediates asked for
by CertificateSigningRequest (the rules: :mod:`agent.identity.csrpolicy`).

The I/O shell around :func:`agent.identity.csrpolicy.review`: list every
CSR, act on each, then watch from the list's resourceVersion and act on
every ADDED/MODIFIED event.  An action is at most three writes:

- ``approve``: GET the node (404: Denied ``UnknownNode``), PUT ``/approval``
  with an Approved condition, then sign;
- ``sign``: issue the intermediate from the root and PUT ``/status`` with
  ``status.certificate`` = the intermediate then the trust bundle, from the
  resourceVersion just read (a concurrent writer makes it a 409, and the
  CSR is read again: it is never signed twice);
- ``deny`` (PUT ``/approval`` with a Denied condition naming the rule) or
  ``fail`` (an Approved CSR that breaks a rule: a Failed condition, unsigned).

Leader election (:mod:`agent.identity.leader`, optional, on by default in
the CLI): replicas share a ``coordination.k8s.io/v1`` Lease; only the
holder lists, watches and writes.  Every write first asks
:meth:`~agent.identity.leader.LeaderElector.is_leader` (a local deadline,
no API call), so a leader that cannot renew stops before its Lease could
be taken; a write already on the wire when that happens is fenced by the
CSR's ``resourceVersion``, like any concurrent writer (409, read again).
On losing the Lease the watch is cut and, once leader again, everything is
listed afresh.

The re-issue limit (:class:`agent.identity.csrpolicy.IssueHistory`): at
most ``ReissueLimit.count`` intermediates per node within its window; a
CSR over it is Denied ``RateLimited`` (Failed, if already approved), the
message naming the limit and when the next one can be signed.

Fail static: any API error (transport, 5xx, 429, 410) writes nothing more
and leads, after a jittered backoff (Retry-After on 429), to a relist, which
re-sees every CSR; the decisions are idempotent, so a CSR left half done
(approved, not signed) is finished then.  A ``/healthz``, ``/readyz`` and
``/metrics`` (counters) server is optional (``--metrics-port``).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..workloads.kubeclient import ApiError, KubeClient, Watch
from .ca import CaError, SigningRoot, issue_node_intermediate
from .csrpolicy import (
    IssueHistory,
    Policy,
    ReissueLimit,
    Verdict,
    certificate_field,
    condition,
    issued,
    review,
)
from .leader import LeaderElector
from .svid import cert_to_pem

log = logging.getLogger("meshlet.ca")

CSRS = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
COUNTERS = ("approved", "signed", "denied", "failed", "rate_limited", "errors", "lists", "watches")


class NotLeader(Exception):
    """This replica does not hold the Lease (any more): write nothing."""


class CaController:
    """One signer.  :meth:`run` until ``stop`` is set; :meth:`handle` acts on one CSR."""

    def __init__(
        self,
        client: KubeClient,
        root: SigningRoot,
        policy: Policy,
        *,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        elector: LeaderElector | None = None,
        reissue: ReissueLimit | None = None,
    ):
        if root.trust_domain != policy.trust_domain:
            raise ValueError("the root and the policy must be of the same trust domain")
        self.client, self.root, self.policy = client, root, policy
        self.watch_timeout, self.request_timeout, self.backoff = watch_timeout, request_timeout, backoff
        self.clock = clock
        self.rng = rng or random.Random()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.rv: str | None = None
        self.connected = False
        self.synced = threading.Event()
        self.error: str | None = None
        self.last_ok: float | None = None
        self._watch: Watch | None = None
        self._stop = threading.Event()
        self.elector = elector
        self.history = IssueHistory(reissue or ReissueLimit())
        if elector is not None:
            elector.on_lost = self._cut_watch

    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    def _put(self, path: str, body: dict) -> dict:
        """Every write goes through here: the leader's, or none."""
        if not self.leading():
            raise NotLeader(f"not the leader: {path} not written")
        return self.client.replace(path, body)

    def _cut_watch(self) -> None:
        w = self._watch
        if w is not None:
            w.abort()

    # --- one CSR ----------------------------------------------------------------------

    def handle(self, csr: dict, _again: bool = True) -> str:
        """Act on one CSR; returns the verdict's action.  Raises ApiError
        when the API fails (nothing more was written; a relist retries)."""
        name = (csr.get("metadata") or {}).get("name", "?")
        try:
            v = review(csr, self.policy)
        except Exception:  # one CSR the rules trip over must not stall every other one
            self.counters["errors"] += 1
            log.exception("CSR %s: not understood, skipped (nothing written)", name)
            return "skipped"
        if v.action == "done" and v.reason == "Issued":
            self._remember(csr)
        try:
            if v.action in ("approve", "sign"):
                assert v.node is not None
                why = self.history.refusal(v.node, self.clock(), csr=name)
                if why is not None:
                    if v.action == "approve":
                        self._decide(name, csr, "Denied", "RateLimited", why)
                    else:
                        self._fail(name, csr, "RateLimited", why)
                    self.counters["rate_limited"] += 1  # written (a stale copy is a 409: read again)
                    return "deny" if v.action == "approve" else "fail"
            if v.action == "approve":
                self._approve(name, csr, v)
            elif v.action == "sign":
                self._sign(name, csr, v)
            elif v.action == "deny":
                self._decide(name, csr, "Denied", v.reason, v.message)
            elif v.action == "fail":
                self._fail(name, csr, v.reason, v.message)
        except ApiError as e:
            if e.status == 404:
                log.info("CSR %s: gone before it was handled", name)
                return "gone"
            if e.status == 409 and _again:
                # someone else wrote it meanwhile: decide again on what is there now
                return self.handle(self.client.get(f"{CSRS}/{name}", timeout=self.request_timeout), False)
            raise
        return v.action

    def _remember(self, csr: dict) -> None:
        """Count the intermediate a signed CSR carries against its node's limit."""
        got = issued(csr, self.policy)
        if got is not None:
            self.history.record(got[0], (csr.get("metadata") or {}).get("name", "?"), got[1])

    def _approve(self, name: str, csr: dict, v: Verdict) -> None:
        assert v.node is not None
        try:
            self.client.get(f"/api/v1/nodes/{v.node}", timeout=self.request_timeout)
        except ApiError as e:
            if e.status != 404:
                raise
            self._decide(
                name,
                csr,
                "Denied",
                "UnknownNode",
                f"the API has no node {v.node!r}; an intermediate is issued only for a node of this cluster",
            )
            return
        csr = self._decide(name, csr, "Approved", "MeshletNodeIntermediate", v.message)
        self._sign(name, csr, v)

    def _decide(self, name: str, csr: dict, ctype: str, reason: str, message: str) -> dict:
        body = dict(csr)
        status = dict(csr.get("status") or {})
        status["conditions"] = [
            *((csr.get("status") or {}).get("conditions") or []),
            condition(ctype, reason, message, self.clock()),
        ]
        body["status"] = status
        out = self._put(f"{CSRS}/{name}/approval", body)
        if ctype == "Approved":
            self.counters["approved"] += 1
            log.info("CSR %s: approved: %s", name, message)
        else:
            self.counters["denied"] += 1
            log.warning("CSR %s: denied (%s): %s", name, reason, message)
        return out

    def _fail(self, name: str, csr: dict, reason: str, message: str) -> None:
        body = dict(csr)
        status = dict(csr.get("status") or {})
        status["conditions"] = [
            *(status.get("conditions") or []),
            condition("Failed", reason, f"approved but not signed: {message}", self.clock()),
        ]
        body["status"] = status
        self._put(f"{CSRS}/{name}/status", body)
        self.counters["failed"] += 1
        log.warning("CSR %s: approved, but not signed (%s): %s", name, reason, message)

    def _sign(self, name: str, csr: dict, v: Verdict) -> None:
        assert v.node is not None and v.ttl is not None
        r = self.root
        try:
            cert = issue_node_intermediate(
                r.trust_domain,
                v.node,
                v.public_key,
                r.cert,
                r.key,
                ttl=v.ttl,
                now=self.clock(),
                name_constraints=r.name_constraints,
            )
        except CaError as e:
            self._fail(name, csr, "SigningFailed", str(e))
            return
        body = dict(csr)
        body["status"] = {
            **(csr.get("status") or {}),
            "certificate": certificate_field(cert_to_pem(cert), r.bundle.to_pem()),
        }
        self._put(f"{CSRS}/{name}/status", body)
        self.history.record(v.node, name, cert.not_valid_before_utc)
        self.counters["signed"] += 1
        log.info(
            "CSR %s: signed node %s's intermediate (serial %x, expires %s)",
            name,
            v.node,
            cert.serial_number,
            cert.not_valid_after_utc.isoformat(),
        )

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """List, act, watch, act; on any API failure back off and relist."""
        attempt = 0
        while not self._stop.is_set():
            if not self.leading():
                assert self.elector is not None
                # a follower: nothing listed, nothing written; once leader, list afresh
                self.rv, self.connected = None, False
                self.synced.clear()
                self.elector.wait_leader(1.0)
                continue
            try:
                if self.rv is None:
                    self._list()
                self._watch_once()
                attempt = 0
            except NotLeader as e:
                self.connected, self.rv = False, None
                log.info("CSRs: %s; following from now on", e)
            except ApiError as e:
                self.connected = False
                if self._stop.is_set():
                    return
                if not self.leading():
                    self.rv = None  # the watch was cut because the lease was lost
                    continue
                self.counters["errors"] += 1
                self.error = str(e)
                self.rv = None  # relist: it re-sees every CSR, and handling is idempotent
                attempt += 1
                delay = self._delay(attempt, e.retry_after if e.status == 429 else None)
                log.warning("CSRs: %s; relisting in %.1fs (nothing half-written is lost)", e, delay)
                self._stop.wait(delay)
            except Exception as e:  # a bug must not end the controller: log, back off, relist
                self.connected = False
                self.counters["errors"] += 1
                self.error = f"{type(e).__name__}: {e}"
                log.exception("CSRs: unexpected error; relisting")
                self.rv = None
                attempt += 1
                self._stop.wait(self._delay(attempt, None))

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.abort()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base, cap = self.backoff
        if retry_after is not None:
            return min(max(retry_after, 0.0), cap)
        hi = min(cap, base * 2 ** min(attempt - 1, 20))
        return self.rng.uniform(hi / 2, hi)

    def _list(self) -> None:
        params: dict[str, str] = {"limit": "500"}
        items: list[dict] = []
        while True:
            doc = self.client.get(CSRS, params, timeout=self.request_timeout)
            items.extend(doc.get("items") or ())
            meta = doc.get("metadata") or {}
            if not meta.get("continue"):
                rv = str(meta.get("resourceVersion") or "")
                break
            params = {"limit": "500", "continue": meta["continue"]}
        self.counters["lists"] += 1
        # what was signed before (by a predecessor too) counts before anything new is decided
        for csr in items:
            self._remember(csr)
        for csr in items:
            self.handle(csr)
        self.rv = rv or None
        self.last_ok, self.error = time.time(), None
        self.synced.set()

    def _watch_once(self) -> None:
        assert self.rv is not None
        timeout = int(self.watch_timeout * self.rng.uniform(1.0, 1.25))
        params = {"resourceVersion": self.rv, "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)}
        w = self.client.watch(CSRS, params, read_timeout=timeout + self.request_timeout)
        self._watch = w
        try:
            if self._stop.is_set():
                return
            self.connected, self.last_ok, self.error = True, time.time(), None
            self.counters["watches"] += 1
            for etype, obj in w:
                self.last_ok = time.time()
                if not self.leading():
                    raise NotLeader("the lease was lost during the watch")
                if etype == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    raise ApiError(410 if code == 410 else 0, f"watch {CSRS}: ERROR event {code}")
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if etype in ("ADDED", "MODIFIED"):
                    self.handle(obj)
                if rv:
                    self.rv = rv
        finally:
            self._watch = None
            self.connected = False
            w.close()

    def status(self) -> dict:
        return {
            "signer": self.policy.signer,
            "trust_domain": self.policy.trust_domain,
            "node_user": self.policy.node_user,
            "root_serial": f"{self.root.cert.serial_number:x}",
            "synced": self.synced.is_set(),
            "connected": self.connected,
            "resource_version": self.rv,
            "last_ok": self.last_ok,
            "error": self.error,
            "counters": dict(self.counters),
            "reissue_limit": self.history.limit.describe(),
            "leader": self.elector.status() if self.elector is not None else None,
        }

    def ready(self) -> tuple[bool, str]:
        """For /readyz: the leader once it lists and watches; a follower once
        it reads the Lease (it is ready to take over)."""
        e = self.elector
        if e is not None and not e.is_leader():
            ok = e.state == "following"
            return ok, f"following: {e.message}" if ok else f"lease: {e.message or e.state}"
        ok = self.synced.is_set() and self.connected
        return ok, "leader, watching CSRs" if ok else f"not watching CSRs: {self.error}"


# --- /healthz, /readyz, /metrics -------------------------------------------------------


class HealthServer:
    """A small HTTP server: ``/healthz`` (the loop thread is alive), ``/readyz``
    (the first list is done and a watch is open), ``/metrics`` (counters)."""

    def __init__(self, ctl: CaController, thread: threading.Thread, address: str, port: int):
        outer = ctl

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    ok = thread.is_alive()
                    self._send(200 if ok else 503, "ok\n" if ok else "the controller loop has stopped\n")
                elif self.path == "/readyz":
                    ok, why = outer.ready()
                    self._send(200 if ok else 503, f"ok: {why}\n" if ok else f"{why}\n")
                elif self.path == "/metrics":
                    self._send(200, _metrics(outer), "text/plain; version=0.0.4")
                elif self.path == "/status":
                    self._send(200, json.dumps(outer.status(), indent=1) + "\n", "application/json")
                else:
                    self._send(404, "not found: try /healthz, /readyz, /metrics or /status\n")

            def _send(self, code: int, text: str, ctype: str = "text/plain") -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ca-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _metrics(ctl: CaController) -> str:
    c = ctl.counters
    lines = [
        "# HELP meshlet_ca_csr_total CSRs of meshlet's signer acted on, by result "
        "(rate_limited ones also count as denied or failed).",
        "# TYPE meshlet_ca_csr_total counter",
        *(
            f'meshlet_ca_csr_total{{result="{k}"}} {c[k]}'
            for k in ("approved", "signed", "denied", "failed", "rate_limited")
        ),
        "# HELP meshlet_ca_api_errors_total Kubernetes API failures (each is followed by a relist).",
        "# TYPE meshlet_ca_api_errors_total counter",
        f"meshlet_ca_api_errors_total {c['errors']}",
        "# HELP meshlet_ca_watching 1 while a watch of CSRs is open.",
        "# TYPE meshlet_ca_watching gauge",
        f"meshlet_ca_watching {int(ctl.connected)}",
        "# HELP meshlet_ca_leader 1 while this replica holds the lease (always 1 without leader election).",
        "# TYPE meshlet_ca_leader gauge",
        f"meshlet_ca_leader {int(ctl.leading())}",
    ]
    return "\n".join(lines) + "\n"
