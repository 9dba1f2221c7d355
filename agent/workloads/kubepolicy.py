"""Policies from the Kubernetes API: every node enforces the cluster's
``AuthorizationPolicy`` (meshlet's, and Istio's where its CRD is installed)
and ``TrafficPolicy`` objects, and says in each meshlet object's status
whether it was accepted.

Three parts, each in its own thread, none on the agent's event loop:

* **watching**: one :class:`PolicyReflector` per kind, the workload
  source's :class:`~agent.workloads.kubernetes.Reflector` (list+watch,
  relist on 410, jittered backoff, fail static) keeping whole policy
  documents.  A kind whose list answers 404 is *not installed*: it holds no
  objects and is listed again every ``recheck`` seconds, so Istio's CRD
  installed later is picked up (and a CRD removed empties its kind, as
  Kubernetes deletes the objects with it).
* **applying**: every change wakes the apply thread, which waits until the
  changes stop for ``settle`` seconds (at most ``max_settle``), reads the
  whole set through :class:`~agent.policycrs.PolicyObjects` (a refused
  object never weakens what is enforced) and hands the result to
  ``apply`` -- the agent's policy store, the path ``meshlet policy apply``
  takes -- only when it changed.  A 1,000-object list is one apply.
  While the API is away nothing changes: the last set stays (fail static).
* **status**: for meshlet's kinds, the ``Accepted`` condition (and
  ``lastAccepted``) is merge-patched into ``/status`` only when what is
  there differs (:func:`~agent.policycrs.desired_status`).  Each write
  waits a random moment first and is checked again against the object as
  last seen, so of N nodes computing the same status usually one writes;
  failures are retried with backoff and never hold up enforcement.
  Istio's objects get no status from meshlet (Istio owns it).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.policycrs import PolicyDoc, PolicyObjects, Verdict, desired_status
from agent.workloads.kubeclient import ApiError, KubeClient
from agent.workloads.kubernetes import Reflector

__all__ = [
    "PolicyResource",
    "POLICY_RESOURCES",
    "PolicyRecord",
    "PolicyReflector",
    "PolicyWatcher",
    "replace_store",
]

log = logging.getLogger("meshlet.kubepolicy")


@dataclass(frozen=True)
class PolicyResource:
    kind: str
    api_version: str
    plural: str
    status: bool
    """meshlet writes this kind's status."""

    @property
    def path(self) -> str:
        return f"/apis/{self.api_version}/{self.plural}"

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.api_version.split('/')[0]}"

    def status_path(self, namespace: str, name: str) -> str:
        return f"/apis/{self.api_version}/namespaces/{namespace}/{self.plural}/{name}/status"


POLICY_RESOURCES = (
    PolicyResource("AuthorizationPolicy", "meshlet.io/v1alpha1", "authorizationpolicies", True),
    PolicyResource("TrafficPolicy", "meshlet.io/v1alpha1", "trafficpolicies", True),
    PolicyResource("AuthorizationPolicy", "security.istio.io/v1", "authorizationpolicies", False),
    PolicyResource("RequestAuthentication", "meshlet.io/v1alpha1", "requestauthentications", True),
    PolicyResource("RequestAuthentication", "security.istio.io/v1", "requestauthentications", False),
)


@dataclass(frozen=True)
class PolicyRecord:
    """One policy object as cached: what the loader reads (compared: a
    change wakes the apply thread) and its status (not compared: the
    status writes of the nodes do not wake it, except ``lastAccepted``,
    which is part of ``doc``)."""

    name: str
    namespace: str
    rv: str
    doc: PolicyDoc
    status: dict[str, Any] = field(compare=False, default_factory=dict)


class PolicyReflector(Reflector):
    """The workload source's reflector, for one policy kind: whole documents,
    and 404 = not installed (see the module docstring)."""

    def __init__(
        self,
        client: KubeClient,
        resource: PolicyResource,
        on_change: Callable[[], None],
        *,
        recheck: float = 60.0,
        **kw: Any,
    ):
        super().__init__(client, resource.label, resource.path, on_change, **kw)
        self.resource = resource
        self.recheck = recheck
        self.absent = False
        """The last list answered 404: the kind's CRD is not installed."""

    def _slim(self, obj: dict) -> PolicyRecord | None:  # type: ignore[override]  # records of its own
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict) or not meta.get("name"):
            self.counts["dropped"] += 1
            log.warning("%s: object without metadata.name, skipped", self.kind)
            return None
        # list items come without apiVersion and kind: they are the resource's
        obj = {**obj, "apiVersion": self.resource.api_version, "kind": self.resource.kind}
        status = obj.get("status")
        return PolicyRecord(
            str(meta["name"]),
            str(meta.get("namespace") or ""),
            str(meta.get("resourceVersion") or ""),
            PolicyDoc.from_object(obj),
            status if isinstance(status, dict) else {},
        )

    def _list(self) -> None:
        while True:
            try:
                super()._list()
            except ApiError as e:
                if e.status != 404:
                    raise
                self._not_installed(e)
                if self._stop.wait(self.recheck):
                    raise ApiError(0, f"{self.kind}: stopped") from None
                continue
            if self.absent:
                log.info("%s: the resource is served now; watching it", self.kind)
            self.absent = False
            return

    def _not_installed(self, e: ApiError) -> None:
        with self.lock:
            had = bool(self.store)
            self.store = {}
            self._tombs.clear()
        if not self.absent:
            # meshlet's own kinds missing is a deployment mistake; Istio's is normal
            (log.warning if self.resource.status else log.info)(
                "%s: not installed (%s); checking again every %gs%s",
                self.kind,
                e,
                self.recheck,
                " (apply deploy/crds)" if self.resource.status else "",
            )
        self.absent, self.rv = True, None
        self.last_ok, self.error = time.time(), None
        first = not self.synced.is_set()
        self.synced.set()
        if had or first:
            self.on_change()

    def records(self) -> list[PolicyRecord]:
        return [r for r in self.snapshot() if isinstance(r, PolicyRecord)]

    def status(self) -> dict:
        return {**super().status(), "installed": not self.absent}


def replace_store(store: Any, sources: list[tuple[str, str]]) -> None:
    """Make the agent's policy store (agent.policy.store.PolicyStore) hold
    exactly ``sources`` -- creations, changes and deletions as one commit,
    one new version (``PolicyStore.replace_all``), whatever the burst or
    relist behind it.  All or nothing: a set the store refuses (a bad
    document, more than its size limit: ``StoreFull`` names both) changes
    nothing, and the previous set stays in force.  Source names are
    :func:`agent.policycrs.object_key` strings.  The caller holds the
    store's lock."""
    store.replace_all(sources, what="the cluster's policy set")


@dataclass
class _StatusWrite:
    resource: PolicyResource
    namespace: str
    name: str
    verdict: Verdict
    spec: dict[str, Any] | None
    attempt: int = 0
    due: float = 0.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PolicyWatcher:
    """See the module docstring.  ``apply(sources)`` gets the whole set as
    (name, document text) pairs, keys in order (empty: no policy at all);
    it raises to have the same set offered again after a backoff."""

    def __init__(
        self,
        client: KubeClient,
        apply: Callable[[list[tuple[str, str]]], None],
        *,
        trust_domain: str,
        root_namespace: str,
        resources: Sequence[PolicyResource] = POLICY_RESOURCES,
        recheck: float = 60.0,
        settle: float = 0.2,
        max_settle: float = 2.0,
        resync: float = 300.0,
        status_jitter: float = 1.0,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        rng: random.Random | None = None,
    ):
        self.client = client
        self._apply = apply
        self.objects = PolicyObjects(trust_domain, root_namespace)
        self.settle, self.max_settle, self.resync = settle, max_settle, resync
        self.status_jitter, self.backoff = status_jitter, backoff
        self.rng = rng or random.Random()
        self.reflectors = [
            PolicyReflector(
                client,
                res,
                self._changed,
                recheck=recheck,
                watch_timeout=watch_timeout,
                request_timeout=request_timeout,
                backoff=backoff,
                rng=self.rng,
            )
            for res in resources
        ]
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.applied = threading.Event()
        """Set once the first complete set has been applied."""
        self._applied_sig: str | None = None
        self.verdicts: dict[str, Verdict] = {}
        self.counts = {"applies": 0, "apply_errors": 0, "status_writes": 0, "status_errors": 0, "reads": 0}
        self.apply_error: str | None = None
        self.last_apply: float | None = None
        self._todo: dict[str, _StatusWrite] = {}
        self._todo_cond = threading.Condition()
        self._lock = threading.Lock()  # one reconcile at a time (PolicyObjects is not thread-safe)
        self._written: dict[str, str] = {}  # key -> resourceVersion our last status write was based on
        self._specs: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (text in force, its spec)
        self._threads = [
            threading.Thread(target=self._apply_loop, name="kube-policy-apply", daemon=True),
            threading.Thread(target=self._status_loop, name="kube-policy-status", daemon=True),
        ]

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> PolicyWatcher:
        for r in self.reflectors:
            r.start()
        for t in self._threads:
            t.start()
        return self

    def wait_applied(self, timeout: float) -> bool:
        return self.applied.wait(timeout)

    def not_synced(self) -> list[str]:
        """What keeps the first apply from happening, for an error message."""
        out = [f"{r.kind} ({r.error or 'no answer yet'})" for r in self.reflectors if not r.synced.is_set()]
        if not out and self.apply_error:
            out.append(f"the apply failed: {self.apply_error}")
        return out

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._todo_cond:
            self._todo_cond.notify_all()
        for r in self.reflectors:
            r._stop.set()
        for r in self.reflectors:
            r.stop()
        for t in self._threads:
            if t.is_alive():
                t.join(5.0)

    def _changed(self) -> None:
        self._wake.set()

    # --- applying ------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        for r in self.reflectors:
            while not r.synced.wait(0.1):
                if self._stop.is_set():
                    return
        attempt = 0
        while not self._stop.is_set():
            # coalesce a burst: go on once nothing changed for `settle` seconds
            start = time.monotonic()
            self._wake.clear()
            while time.monotonic() - start < self.max_settle and self._wake.wait(self.settle):
                if self._stop.is_set():
                    return
                self._wake.clear()
            try:
                self.reconcile()
                attempt = 0
                wait = self.resync
            except (OSError, ValueError) as e:  # the store refused or could not write: SourceError, OSError
                attempt += 1
                wait = self._failed(e, attempt)
                log.error("policies from the cluster: %s; the last set stays, retrying in %.1fs", e, wait)
            except Exception as e:  # a bug must not end the watching: the last set stays
                attempt += 1
                wait = self._failed(e, attempt)
                log.exception("policies from the cluster: unexpected error; retrying in %.1fs", wait)
            self._wake.wait(wait)

    def _failed(self, e: BaseException, attempt: int) -> float:
        self.counts["apply_errors"] += 1
        self.apply_error = f"{type(e).__name__}: {e}"
        base, cap = self.backoff
        return self.rng.uniform(0.5, 1.0) * min(cap, base * 2 ** min(attempt - 1, 20))

    def reconcile(self) -> None:
        """Read every cached object, apply the set if it changed, plan the
        status writes.  Called by the apply thread (and by tests)."""
        with self._lock:
            self._reconcile()

    def _reconcile(self) -> None:
        recs = [(r.resource, rec) for r in self.reflectors for rec in r.records()]
        verdicts = self.objects.sync(rec.doc for _res, rec in recs)
        self.counts["reads"] += 1
        texts = self.objects.texts()
        sig = hashlib.sha256(repr(texts).encode()).hexdigest()
        if sig != self._applied_sig:
            self._apply(texts)
            self._applied_sig = sig
            self.counts["applies"] += 1
            self.last_apply = time.time()
            log.info("policies from the cluster: %d in force of %d objects", len(texts), len(recs))
        self.apply_error = None
        for v in verdicts.values():
            if not v.accepted and self.verdicts.get(v.key) != v:
                log.warning("policy %s refused: %s", v.key, "; ".join(v.message_lines()))
        self.verdicts = verdicts
        self._plan_status(recs, verdicts)
        self.applied.set()

    def _spec_in_force(self, key: str) -> dict[str, Any] | None:
        got = self.objects.in_force(key)
        if got is None:
            return None
        cached = self._specs.get(key)
        if cached is not None and cached[0] == got[1]:
            return cached[1]
        doc = yaml.safe_load(got[1]) or {}
        raw = doc.get("spec")
        spec: dict[str, Any] = raw if isinstance(raw, dict) else {}
        self._specs[key] = (got[1], spec)
        return spec

    def _plan_status(
        self, recs: list[tuple[PolicyResource, PolicyRecord]], verdicts: dict[str, Verdict]
    ) -> None:
        now = _now()
        with self._todo_cond:
            for res, rec in recs:
                if not res.status:
                    continue
                v = verdicts[rec.doc.key]
                spec = self._spec_in_force(rec.doc.key)
                if self._written.get(rec.doc.key) == rec.rv:
                    continue  # written from this version; its event has not arrived yet
                if desired_status(v, rec.status, spec, now) is None:
                    self._todo.pop(rec.doc.key, None)
                    continue
                old = self._todo.get(rec.doc.key)
                if old is not None and old.verdict == v:
                    continue  # already queued (maybe backing off)
                due = time.monotonic() + self.rng.uniform(0.0, self.status_jitter)
                self._todo[rec.doc.key] = _StatusWrite(res, rec.namespace, rec.name, v, spec, due=due)
            keys = {rec.doc.key for _res, rec in recs}
            for k in [k for k in self._todo if k not in keys]:
                del self._todo[k]
            for k in [k for k in self._written if k not in keys]:
                del self._written[k]
            for k in [k for k in self._specs if k not in keys]:
                del self._specs[k]
            self._todo_cond.notify_all()

    # --- status --------------------------------------------------------------------------

    def _current(self, w: _StatusWrite) -> PolicyRecord | None:
        for r in self.reflectors:
            if r.resource == w.resource:
                with r.lock:
                    got = r.store.get(f"{w.namespace}/{w.name}" if w.namespace else w.name)
                return got if isinstance(got, PolicyRecord) else None
        return None

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            with self._todo_cond:
                now = time.monotonic()
                due = [w for w in self._todo.values() if w.due <= now]
                if not due:
                    nxt = min((w.due for w in self._todo.values()), default=now + 1.0)
                    self._todo_cond.wait(max(0.01, min(nxt - now, 1.0)))
                    continue
            # every node has the same list: each in its own order, so that of
            # a burst most objects are written by one node and skipped by the others
            self.rng.shuffle(due)
            for w in due:
                if self._stop.is_set():
                    return
                self._write_status(w)

    def _write_status(self, w: _StatusWrite) -> None:
        key = w.verdict.key
        rec = self._current(w)
        patch = None
        if rec is not None and rec.doc.generation == w.verdict.generation:
            # as last seen: another node may have written the same already
            patch = desired_status(w.verdict, rec.status, w.spec, _now())
        if patch is None:
            self._done(key, w)
            return
        try:
            self.client.merge_patch(w.resource.status_path(w.namespace, w.name), patch)
        except ApiError as e:
            if e.status == 404:  # deleted meanwhile
                self._done(key, w)
                return
            self.counts["status_errors"] += 1
            w.attempt += 1
            base, cap = self.backoff
            delay = self.rng.uniform(0.5, 1.0) * min(cap, base * 2 ** min(w.attempt - 1, 20))
            w.due = time.monotonic() + delay
            log.warning("status of %s: %s; retrying in %.1fs (enforcement is not affected)", key, e, delay)
            return
        self.counts["status_writes"] += 1
        with self._todo_cond:
            self._written[key] = rec.rv if rec is not None else ""
        self._done(key, w)

    def _done(self, key: str, w: _StatusWrite) -> None:
        with self._todo_cond:
            if self._todo.get(key) is w:
                del self._todo[key]

    # --- status for `meshlet status` ---------------------------------------------------

    def describe(self) -> dict:
        refused = [
            {
                "object": v.key,
                "generation": v.generation,
                "in_force": v.in_force,
                "problems": list(v.problems),
            }
            for v in sorted(self.verdicts.values(), key=lambda v: v.key)
            if not v.accepted
        ]
        down = [r for r in self.reflectors if not r.connected and not r.absent]
        known = [r.last_ok for r in down if r.last_ok is not None]
        since = min(known) if down and len(known) == len(down) else None
        return {
            "source": "kubernetes",
            "server": self.client.server,
            "in_sync": not down,
            "stale_s": None if since is None else round(time.time() - since, 1),
            "objects": len(self.verdicts),
            "refused": refused[:20],
            "refused_total": len(refused),
            "last_apply": self.last_apply,
            "apply_error": self.apply_error,
            "status_pending": len(self._todo),
            **self.counts,
            "resources": [r.status() for r in self.reflectors],
        }
