"""The node's side of intermediates by CSR (Kubernetes mode,
``identity.nodeCA: csr``): keep this node's intermediate valid by asking
the CA controller (:mod:`agent.identity.controller`) for it.

A thread checks the identity files (``identity.caCert``/``caKey``/
``bundle``).  When they are missing, unusable, not this node's, or in the
last third of their lifetime (:func:`agent.identity.csrpolicy.renewal_due`),
it:

1. generates a P-256 key on the node (kept in ``<caKey>.pending``, 0600, so
   an agent restart keeps waiting for the same CSR instead of asking again;
   the key never leaves the node: only its CSR does);
2. creates a CertificateSigningRequest (``generateName``, signer
   ``meshlet.io/node-intermediate``, usages ``cert sign``/``crl sign``),
   its name kept in ``<caKey>.pending.json`` (:func:`read_pending`);
3. reads it back with a bounded, jittered backoff until it carries a
   certificate (then checks it: this node's CA, for this key, chaining to
   the roots that came with it), or is Denied/Failed (the reason is shown;
   a new request follows after a longer backoff -- or, when the controller's
   re-issue limit refused it (``RateLimited``), at the time its message
   names: :func:`agent.identity.csrpolicy.limited_until`), or is gone (asks
   again).

``<caKey>.pending.json`` is also the request's record for an operator
without a running agent (``meshlet doctor`` reads it)::

    {"csr": "meshlet-node-a-x1y2z", "node": "a", "created": "<RFC 3339>",
     "state": "waiting" | "approved" | "denied",
     "updated": "<RFC 3339>",                     # when the state was last seen
     "condition": "Denied" | "Failed",            # when denied:
     "reason": "WrongNode", "message": "..."}     #   what the controller said

It is rewritten when the state changes; on a denial the pending key is
removed and the record stays (saying why) until the next request replaces
it; once the intermediate is installed both files are removed.

The files are written by :meth:`NodeEnroller.install`, called from the
agent's loop right before it polls the identity files, so the agent never
sees a new key beside an old certificate.  Until the node has an
intermediate it signs no workload certificate (the agent's issuer is not
loaded: fail closed), and :meth:`NodeEnroller.status` says why
("waiting for CSR <name> to be approved", or the Denied reason), which
``meshlet status`` shows.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..fsutil import write_atomic
from ..workloads.kubeclient import ApiError, KubeClient
from .csrpolicy import (
    SIGNER,
    check_issued,
    conditions,
    csr_object,
    limited_until,
    make_node_csr,
    renewal_due,
)
from .issuer import IdentityFilesError, load_material
from .svid import cert_to_pem, generate_key, key_to_pem, load_key_pem

log = logging.getLogger("meshlet.identity")

CSRS = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
#: The longest a node waits on the controller's re-issue limit before asking again (seconds).
MAX_LIMIT_WAIT = 7 * 24 * 3600.0


@dataclass
class _Signed:
    key_pem: bytes
    cert_pem: bytes
    bundle_pem: bytes
    csr: str


PENDING_STATES = ("waiting", "approved", "denied")


def read_pending(path: str) -> dict:
    """A ``<caKey>.pending.json`` record (module docstring).  Raises OSError
    (FileNotFoundError: no request pending) or ValueError naming the file
    and what is wrong with it."""
    with open(path) as f:
        text = f.read(65536)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("csr"), str) or not doc["csr"]:
        raise ValueError(f"{path}: no CSR name (field 'csr')")
    state = doc.setdefault("state", "waiting")  # written before the states were recorded
    if state not in PENDING_STATES:
        raise ValueError(f"{path}: field 'state' is {state!r}; expected one of {', '.join(PENDING_STATES)}")
    return doc


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeEnroller:
    """See the module docstring.  ``start()``, then ``install()`` from the
    agent's loop; ``status()`` for ``meshlet status``."""

    def __init__(
        self,
        client: KubeClient,
        node: str,
        trust_domain: str,
        bundle_path: str,
        cert_path: str,
        key_path: str,
        *,
        signer: str = SIGNER,
        check_interval: float = 60.0,
        poll: tuple[float, float] = (1.0, 30.0),
        retry: tuple[float, float] = (5.0, 600.0),
        request_timeout: float = 15.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ):
        self.client, self.node, self.trust_domain = client, node, trust_domain
        self.bundle_path, self.cert_path, self.key_path = bundle_path, cert_path, key_path
        self.signer = signer
        self.check_interval, self.poll, self.retry = check_interval, poll, retry
        self.request_timeout = request_timeout
        self.clock = clock
        self.rng = rng or random.Random()
        self.state = "starting"
        """valid | requesting | waiting | denied | error | installing"""
        self.message = ""
        self.csr_name: str | None = None
        self.counters = {"requested": 0, "issued": 0, "denied": 0, "errors": 0}
        self._lock = threading.Lock()
        self._ready: _Signed | None = None
        self._installed = threading.Event()
        self._pending: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-csr", daemon=True)

    @property
    def pending_key(self) -> str:
        return self.key_path + ".pending"

    @property
    def pending_state(self) -> str:
        return self.key_path + ".pending.json"

    # --- the agent's side -------------------------------------------------------------------

    def start(self) -> NodeEnroller:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._installed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def install(self) -> bool:
        """Write a newly signed intermediate where the identity config expects
        it (from the agent's loop thread, before it polls the files).  True
        when it wrote."""
        with self._lock:
            signed, self._ready = self._ready, None
        if signed is None:
            return False
        for p in (self.key_path, self.cert_path, self.bundle_path):
            os.makedirs(os.path.dirname(p) or ".", mode=0o700, exist_ok=True)
        write_atomic(self.key_path, signed.key_pem.decode(), mode=0o600)
        write_atomic(self.cert_path, signed.cert_pem.decode(), mode=0o644)
        write_atomic(self.bundle_path, signed.bundle_pem.decode(), mode=0o644)
        self._clear_pending()
        self._set("valid", f"intermediate from CSR {signed.csr} installed")
        log.info("node intermediate from CSR %s written to %s", signed.csr, self.cert_path)
        self._installed.set()
        return True

    def status(self) -> dict:
        return {
            "mode": "csr",
            "signer": self.signer,
            "state": self.state,
            "message": self.message,
            "csr": self.csr_name,
            "counters": dict(self.counters),
        }

    # --- the thread ------------------------------------------------------------------------

    def _set(self, state: str, message: str) -> None:
        if (state, message) != (self.state, self.message):
            self.state, self.message = state, message

    def needed(self) -> str | None:
        """Why this node needs a (new) intermediate now, or None."""
        try:
            m = load_material(self.trust_domain, self.bundle_path, self.cert_path, self.key_path)
        except IdentityFilesError as e:
            return f"no usable intermediate: {e}"
        from .svid import issuing_node

        got = issuing_node(m.ca_cert, self.trust_domain)
        if got != self.node:
            return f"{self.cert_path} is not node {self.node}'s CA (it is {got!r}'s)"
        return renewal_due(m.ca_cert, self.clock())

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            why = self.needed()
            if why is None:
                failures = 0
                if self.state != "valid":
                    self._set("valid", "the node intermediate is valid")
                self._stop.wait(self.check_interval)
                continue
            try:
                signed = self._obtain(why)
            except ApiError as e:
                failures += 1
                self.counters["errors"] += 1
                delay = self._delay(self.retry, failures)
                self._set(
                    "error",
                    f"cannot reach the API for the node intermediate ({e}); retrying in {delay:.0f}s",
                )
                log.warning("node intermediate: %s; retrying in %.0fs", e, delay)
                self._stop.wait(delay)
                continue
            except _Refused as r:
                failures += 1
                self.counters["denied"] += 1
                self._clear_pending(keep_record=True)
                delay = self._delay(self.retry, failures)
                if r.not_before is not None:
                    # the controller's re-issue limit: asking before then is refused again
                    wait = (r.not_before - self.clock()).total_seconds() + self.rng.uniform(1.0, 30.0)
                    delay = min(max(delay, wait), MAX_LIMIT_WAIT)
                self._set("denied", f"{r}; asking again in {delay:.0f}s")
                log.error("node intermediate: %s; asking again in %.0fs", r, delay)
                self._stop.wait(delay)
                continue
            if signed is None:
                continue  # stopping, or the CSR vanished: ask again
            failures = 0
            self.counters["issued"] += 1
            with self._lock:
                self._installed.clear()
                self._ready = signed
            self._set("installing", f"CSR {signed.csr} signed; installing")
            while not self._stop.is_set() and not self._installed.wait(1.0):
                pass

    def _obtain(self, why: str) -> _Signed | None:
        key, name = self._resume()
        if key is None or name is None:
            key = generate_key()
            os.makedirs(os.path.dirname(self.pending_key) or ".", mode=0o700, exist_ok=True)
            write_atomic(self.pending_key, key_to_pem(key).decode(), mode=0o600)
            self._set("requesting", f"asking for an intermediate: {why}")
            obj = csr_object(self.node, make_node_csr(self.trust_domain, self.node, key), signer=self.signer)
            made = self.client.create(CSRS, obj)
            name = made["metadata"]["name"]
            now = _stamp(self.clock())
            self._record({"csr": name, "node": self.node, "created": now, "state": "waiting", "updated": now})
            self.counters["requested"] += 1
            log.info("node intermediate: %s; created CSR %s", why, name)
        self.csr_name = name
        attempt = 0
        while not self._stop.is_set():
            try:
                csr = self.client.get(f"{CSRS}/{name}", timeout=self.request_timeout)
            except ApiError as e:
                if e.status == 404:
                    log.warning("CSR %s is gone; asking again", name)
                    self._clear_pending()
                    return None
                raise
            conds = conditions(csr)
            for t in ("Denied", "Failed"):
                if t in conds:
                    c = conds[t]
                    self._note(name, "denied", condition=t, reason=c.get("reason"), message=c.get("message"))
                    raise _Refused(
                        f"CSR {name} was {t.lower()}: {c.get('reason')}: {c.get('message')}",
                        not_before=limited_until(c),
                    )
            cert_b64 = (csr.get("status") or {}).get("certificate")
            if cert_b64:
                try:
                    pem = base64.b64decode(cert_b64)
                    inter, roots = check_issued(pem, key, self.trust_domain, self.node, self.clock())
                except ValueError as e:
                    self._note(name, "denied", condition="Refused", reason="BadCertificate", message=str(e))
                    raise _Refused(f"CSR {name}: the signed certificate is refused: {e}") from None
                return _Signed(
                    key_to_pem(key),
                    cert_to_pem(inter),
                    b"".join(cert_to_pem(r) for r in roots),
                    name,
                )
            approved = "Approved" in conds
            self._note(name, "approved" if approved else "waiting")
            self._set(
                "waiting",
                f"waiting for CSR {name} to be {'signed' if approved else 'approved'} "
                "(by meshlet ca controller); no workload certificates until then",
            )
            attempt += 1
            self._stop.wait(self._delay(self.poll, attempt))
        return None

    def _resume(self):
        """(key, CSR name) of a request made before a restart, when both are there."""
        try:
            with open(self.pending_key, "rb") as f:
                key = load_key_pem(f.read())
            self._pending = read_pending(self.pending_state)
        except (OSError, ValueError, KeyError, TypeError):
            return None, None
        return key, self._pending["csr"]

    def _record(self, doc: dict) -> None:
        os.makedirs(os.path.dirname(self.pending_state) or ".", mode=0o700, exist_ok=True)
        write_atomic(self.pending_state, json.dumps(doc), mode=0o600)
        self._pending = doc

    def _note(self, name: str, state: str, **more) -> None:
        """Record the request's state for ``meshlet doctor`` (only when it changed)."""
        old = self._pending if self._pending.get("csr") == name else {"csr": name, "node": self.node}
        if old.get("state") == state and all(old.get(k) == v for k, v in more.items()):
            return
        doc = {k: v for k, v in old.items() if k not in ("condition", "reason", "message")}
        doc.update({k: v for k, v in more.items() if v is not None})
        doc.update(state=state, updated=_stamp(self.clock()))
        try:
            self._record(doc)
        except OSError as e:  # a record for operators: never a reason to stop asking
            log.warning("cannot write %s: %s", self.pending_state, e)

    def _clear_pending(self, *, keep_record: bool = False) -> None:
        """Remove the pending key, and the record too unless ``keep_record``
        (a denial: it says why until the next request replaces it)."""
        for p in (self.pending_key,) if keep_record else (self.pending_key, self.pending_state):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if not keep_record:
            self._pending = {}

    def _delay(self, bounds: tuple[float, float], attempt: int) -> float:
        base, cap = bounds
        hi = min(cap, base * 2 ** min(attempt - 1, 20))
        return self.rng.uniform(hi / 2, hi)


class _Refused(Exception):
    """The controller said no (Denied/Failed), or signed something unusable;
    ``not_before``: when a re-issue-limited request may be made again."""

    def __init__(self, message: str, *, not_before: datetime | None = None):
        super().__init__(message)
        self.not_before = not_before


def enroller_for(cfg, source) -> NodeEnroller | None:
    """The enroller ``cfg`` asks for (``identity.nodeCA: csr``), talking to
    the API through the Kubernetes workload source's client; else None."""
    i = cfg.identity
    if i.node_ca != "csr":
        return None
    client = getattr(source, "client", None)
    if not isinstance(client, KubeClient):
        raise ValueError(
            "identity.nodeCA: csr needs the Kubernetes workload source (workloads.source: kubernetes)"
        )
    return NodeEnroller(client, cfg.node, i.trust_domain, i.bundle, i.ca_cert, i.ca_key)
