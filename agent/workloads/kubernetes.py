"""The Kubernetes API as a :class:`~agent.workloads.source.WorkloadSource`.

One :class:`Reflector` thread per resource (Nodes, Namespaces, Pods,
Services, EndpointSlices) keeps a cache of slim records
(:mod:`agent.workloads.kubeobjects`) with informer semantics:

* **list** (in pages of ``limit``), remember the list's resourceVersion;
* **watch** from it with ``allowWatchBookmarks``; every event and bookmark
  advances the resourceVersion, so a reconnect resumes where it stopped;
* **410 Gone** (on the watch request or as an ERROR event) or any other
  ERROR event: **relist** and replace the cache;
* transport errors, 5xx and a watch silent for longer than its timeout
  (hung): reconnect after a jittered exponential backoff; **429**: wait
  what Retry-After says;
* duplicate and out-of-order events are dropped: an event whose object is
  not newer than the cached one (or than its deletion) changes nothing.
  ResourceVersions are opaque by contract; they are compared as integers
  when both are (etcd revisions, every real API server), else the newer
  event wins.

A change that touches a field meshlet uses bumps a version number;
:meth:`KubernetesSource.poll` (the agent's tick thread) builds a new
inventory when the version moved and never waits on the network.  While
the API is away the last inventory stays in force (fail static) and
:meth:`KubernetesSource.describe` says since when the source is stale and
why.
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from agent import cgroup as cg
from agent.workloads import kubecgroup
from agent.workloads.kubeclient import ApiError, KubeClient, Watch
from agent.workloads.kubeobjects import Record, build_inventory, slim
from agent.workloads.model import Inventory
from agent.workloads.source import SourceStatus

__all__ = ["RESOURCES", "Reflector", "KubernetesSource"]

log = logging.getLogger("meshlet.kubernetes")

#: (kind, collection path) of everything the source reads.
RESOURCES = (
    ("Node", "/api/v1/nodes"),
    ("Namespace", "/api/v1/namespaces"),
    ("Pod", "/api/v1/pods"),
    ("Service", "/api/v1/services"),
    ("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices"),
)

_TOMBSTONES = 10_000  # deletions remembered to drop late events for them


def _newer(a: str, b: str) -> bool:
    """resourceVersion ``a`` is newer than ``b`` (see the module docstring)."""
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a != b


def _same(a: Record, b: Record) -> bool:
    """Equal in everything meshlet uses (the resourceVersion aside)."""
    return a == replace(b, rv=a.rv)


class Reflector:
    """List+watch of one resource into ``store`` (key ``namespace/name``)."""

    def __init__(
        self,
        client: KubeClient,
        kind: str,
        path: str,
        on_change: Callable[[], None],
        *,
        page_size: int = 500,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        rng: random.Random | None = None,
    ):
        self.client, self.kind, self.path = client, kind, path
        self.on_change = on_change
        self.page_size, self.watch_timeout, self.request_timeout = page_size, watch_timeout, request_timeout
        self.backoff = backoff
        self.rng = rng or random.Random()
        self.lock = threading.Lock()
        self.store: dict[str, Record] = {}
        self.rv: str | None = None
        self.synced = threading.Event()
        """Set once the first list has been applied."""
        self.connected = False
        """A watch stream is open (False while listing, backing off or down)."""
        self.last_ok: float | None = None
        """When the cache was last known current (a list, a watch opening, an event)."""
        self.error: str | None = None
        self.counts = {"lists": 0, "watches": 0, "events": 0, "dropped": 0, "errors": 0}
        self._tombs: OrderedDict[str, str] = OrderedDict()
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"kube-{kind}", daemon=True)

    def start(self) -> Reflector:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.abort()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> list[Record]:
        with self.lock:
            return list(self.store.values())

    # --- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        attempt = gone = 0
        while not self._stop.is_set():
            try:
                if self.rv is None:
                    self._list()
                self._watch_once()
                attempt = gone = 0
            except ApiError as e:
                self.connected = False
                if self._stop.is_set():
                    return
                self.counts["errors"] += 1
                if e.status == 410:
                    log.info("%s: %s; relisting", self.kind, e)
                    self.rv = None
                    gone += 1
                    if gone == 1:
                        continue  # relist at once: the cache is only behind, not wrong
                    # 410 again right after a relist: back off rather than spin
                self.error = str(e)
                attempt += 1
                delay = self._delay(attempt, e.retry_after if e.status == 429 else None)
                log.warning("%s: %s; retrying in %.1fs (last good state kept)", self.kind, e, delay)
                self._stop.wait(delay)
            except Exception as e:  # a bug here must not end the watch for good: log, relist
                self.connected = False
                if self._stop.is_set():
                    return
                self.counts["errors"] += 1
                self.error = f"{type(e).__name__}: {e}"
                log.exception("%s: unexpected error; relisting", self.kind)
                self.rv = None
                attempt += 1
                self._stop.wait(self._delay(attempt, None))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base, cap = self.backoff
        if retry_after is not None:
            return min(max(retry_after, 0.0), cap)
        hi = min(cap, base * 2 ** min(attempt - 1, 20))
        return self.rng.uniform(hi / 2, hi)  # jittered, so nodes do not reconnect in step

    def _list(self) -> None:
        items: dict[str, Record] = {}
        params: dict[str, str] = {"limit": str(self.page_size)}
        while True:
            doc = self.client.get(self.path, params, timeout=self.request_timeout)
            for obj in doc.get("items") or ():
                rec = self._slim(obj)
                if rec is not None:
                    items[_key(rec)] = rec
            meta = doc.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                rv = str(meta.get("resourceVersion") or "")
                break
            params = {"limit": str(self.page_size), "continue": cont}
        with self.lock:
            old = self.store
            changed = old.keys() != items.keys() or any(not _same(old[k], v) for k, v in items.items())
            self.store = items
            self._tombs.clear()
        self.rv = rv or None
        self.counts["lists"] += 1
        self.last_ok, self.error = time.time(), None
        self.synced.set()
        if changed:
            self.on_change()

    def _watch_once(self) -> None:
        assert self.rv is not None
        timeout = int(self.watch_timeout * self.rng.uniform(1.0, 1.25))
        params = {"resourceVersion": self.rv, "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)}
        w = self.client.watch(self.path, params, read_timeout=timeout + self.request_timeout)
        self._watch = w
        try:
            if self._stop.is_set():
                return
            self.connected, self.last_ok, self.error = True, time.time(), None
            self.counts["watches"] += 1
            for etype, obj in w:
                self.last_ok = time.time()
                self._event(etype, obj)
        finally:
            self._watch = None
            self.connected = False
            w.close()

    def _slim(self, obj: dict) -> Record | None:
        try:
            return slim(self.kind, obj)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.counts["dropped"] += 1
            log.warning("%s: object not understood, skipped: %s", self.kind, e)
            return None

    def _event(self, etype: str, obj: dict) -> None:
        if etype == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            msg = obj.get("message") if isinstance(obj, dict) else None
            self.rv = None  # whatever went wrong, the stream cannot be trusted from here: relist
            raise ApiError(410 if code == 410 else 0, f"watch {self.path}: ERROR event {code}: {msg}")
        meta = obj.get("metadata") or {}
        rv = str(meta.get("resourceVersion") or "")
        if etype == "BOOKMARK":
            if rv:
                self.rv = rv
            return
        self.counts["events"] += 1
        rec = self._slim(obj)
        if rec is None:
            return
        key = _key(rec)
        changed = False
        with self.lock:
            cur = self.store.get(key)
            tomb = self._tombs.get(key)
            if etype in ("ADDED", "MODIFIED"):
                if (cur is not None and not _newer(rec.rv, cur.rv)) or (
                    tomb is not None and not _newer(rec.rv, tomb)
                ):
                    self.counts["dropped"] += 1  # a duplicate, or older than what we have
                else:
                    changed = cur is None or not _same(cur, rec)
                    self.store[key] = rec
                    self._tombs.pop(key, None)
            elif etype == "DELETED":
                if cur is not None and not _newer(rec.rv, cur.rv) and rec.rv != cur.rv:
                    self.counts["dropped"] += 1  # a late deletion of an older incarnation
                else:
                    changed = self.store.pop(key, None) is not None
                    self._tombs[key] = rec.rv
                    while len(self._tombs) > _TOMBSTONES:
                        self._tombs.popitem(last=False)
            else:
                self.counts["dropped"] += 1
        if rv and (self.rv is None or _newer(rv, self.rv)):
            self.rv = rv
        if changed:
            self.on_change()

    def status(self) -> dict:
        return {
            "kind": self.kind,
            "synced": self.synced.is_set(),
            "connected": self.connected,
            "resource_version": self.rv,
            "objects": len(self.store),
            "last_ok": self.last_ok,
            "error": self.error,
            **self.counts,
        }


def _key(rec: Record) -> str:
    ns = getattr(rec, "namespace", "")
    return f"{ns}/{rec.name}" if ns else rec.name


class KubernetesSource:
    """Workloads from the Kubernetes API (see the module docstring)."""

    kind = "kubernetes"

    def __init__(
        self,
        client: KubeClient,
        node: str,
        *,
        cgroup_root: str | None = None,
        sync_timeout: float = 60.0,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        page_size: int = 500,
        backoff: tuple[float, float] = (0.5, 30.0),
    ):
        self.client, self.node = client, node
        self._cgroup_root = cgroup_root
        self.sync_timeout = sync_timeout
        self._lock = threading.Lock()
        self._version = 0
        self._built = -1
        self._driver: str | None = None
        self.inventory: Inventory | None = None
        self.notes: list[str] = []
        self._last_good: float | None = None
        self.reflectors = {
            kind: Reflector(
                client,
                kind,
                path,
                self._bump,
                page_size=page_size,
                watch_timeout=watch_timeout,
                request_timeout=request_timeout,
                backoff=backoff,
            )
            for kind, path in RESOURCES
        }
        self._started = False

    @property
    def where(self) -> str:
        return self.client.server

    def _bump(self) -> None:
        with self._lock:
            self._version += 1

    @property
    def cgroup_root(self) -> str:
        """The kubelet's cgroup root (``workloads.kubeletCgroupRoot``), absolute."""
        return cg.resolve(self._cgroup_root or "")

    @property
    def driver(self) -> str | None:
        return self._driver

    def start(self) -> Inventory:
        """Start watching; the first inventory once every resource is listed.
        Raises TimeoutError (an OSError) naming what did not sync and why."""
        if not self._started:
            self._started = True
            for r in self.reflectors.values():
                r.start()
        deadline = time.monotonic() + self.sync_timeout
        for r in self.reflectors.values():
            if not r.synced.wait(max(0.0, deadline - time.monotonic())):
                missing = [
                    f"{x.kind} ({x.error or 'no answer yet'})"
                    for x in self.reflectors.values()
                    if not x.synced.is_set()
                ]
                self.close()
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"Kubernetes API {self.where}: not synced within {self.sync_timeout:g}s: "
                    + "; ".join(missing),
                )
        inv = self._build()
        assert inv is not None
        return inv

    def poll(self) -> Inventory | None:
        """A new inventory when the cache changed (or the kubelet's cgroup driver
        just appeared); None otherwise.  Never waits."""
        if self._driver is None and kubecgroup.detect_driver(self.cgroup_root) is not None:
            self._bump()
        with self._lock:
            if self._version == self._built:
                return None
        return self._build()

    def _build(self) -> Inventory | None:
        with self._lock:
            version = self._version
        root = self.cgroup_root
        self._driver = kubecgroup.detect_driver(root)
        # Undetected (the kubelet has not made its tree yet): the systemd path,
        # which does not exist either, so the agent keeps the pod pending and
        # retries; poll() rebuilds once the driver appears.
        driver = self._driver or "systemd"
        snap = {k: r.snapshot() for k, r in self.reflectors.items()}
        inv, notes = build_inventory(
            # each reflector holds the record type of its kind; the dict of them is typed by the base
            pods=snap["Pod"],  # type: ignore[arg-type]
            nodes=snap["Node"],  # type: ignore[arg-type]
            namespaces=snap["Namespace"],  # type: ignore[arg-type]
            services=snap["Service"],  # type: ignore[arg-type]
            slices=snap["EndpointSlice"],  # type: ignore[arg-type]
            this_node=self.node,
            cgroup_of=lambda p: kubecgroup.pod_cgroup(root, driver, p.uid, p.qos),
        )
        if self._driver is None:
            notes.insert(
                0, f"kubelet cgroup tree not found under {root} (neither kubepods.slice nor kubepods)"
            )
        self.inventory, self.notes = inv, notes
        self._built = version
        self._last_good = time.time()
        return inv

    def describe(self) -> SourceStatus:
        rs = list(self.reflectors.values())
        down = [r for r in rs if not r.connected]
        error = "; ".join(f"{r.kind}: {r.error}" for r in rs if r.error) or None
        synced_at = None
        if down:
            known = [r.last_ok for r in down if r.last_ok is not None]
            synced_at = min(known) if len(known) == len(down) else None
        else:
            synced_at = time.time()
        detail = {
            "in_sync": not down,
            "in_sync_at": synced_at,
            "stale_s": None if not down or synced_at is None else round(time.time() - synced_at, 1),
            "cgroup_root": self.cgroup_root,
            "cgroup_driver": self._driver,
            "notes": self.notes[:20],
            "notes_total": len(self.notes),
            "resources": [r.status() for r in rs],
        }
        return SourceStatus(self.kind, self.where, self._last_good, error, detail)

    def close(self) -> None:
        for r in self.reflectors.values():
            r._stop.set()
        for r in self.reflectors.values():
            r.stop()
