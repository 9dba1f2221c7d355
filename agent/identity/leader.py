"""Leader election for ``meshlet ca controller`` replicas: the I/O shell
around :mod:`agent.identity.leaderlease` (the rules are there).

One thread per replica reads the Lease every ``retry_period`` and acquires
or renews it with a PUT from the ``resourceVersion`` just read (409: another
replica wrote first; it lost this round).  :meth:`LeaderElector.is_leader`
needs no API call and no help from that thread: it compares the monotonic
clock with the deadline set by the last successful renewal, so a leader
whose renewals fail -- or whose thread is stuck -- stops being the leader on
time, before any other replica may take over.  The controller asks it right
before every write.  ``on_lost`` (called from the election thread when it
notices the lapse) lets the controller end its watch at once.

:meth:`LeaderElector.stop` releases the Lease (holder emptied) when this
replica holds it, so a rolling update hands over in one retry period
instead of a whole lease duration.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ..workloads.kubeclient import ApiError, KubeClient
from .leaderlease import LeaseConfig, LeaseRecord, plan, read_lease, release_object

log = logging.getLogger("meshlet.ca.leader")


class LeaderElector:
    """See the module docstring.  ``start()``; ``is_leader()`` from any thread."""

    def __init__(
        self,
        client: KubeClient,
        cfg: LeaseConfig,
        *,
        request_timeout: float | None = None,
        on_lost: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.client, self.cfg = client, cfg
        # a request may not outlast the time a leader has left to renew
        self.request_timeout = request_timeout or max(1.0, cfg.renew_deadline / 2)
        self.on_lost = on_lost
        self.clock, self.monotonic = clock, monotonic
        self.rng = rng or random.Random()
        self.record: LeaseRecord | None = None
        self._seen: tuple[tuple | None, float] | None = None
        self._valid_until = 0.0
        self._was_leader = False
        self.state = "starting"
        """starting | leader | following | error"""
        self.message = ""
        self.counters = {"acquired": 0, "renewed": 0, "lost": 0, "conflicts": 0, "errors": 0}
        self._leading = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="ca-leader", daemon=True)

    # --- any thread ---------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """True until ``renew_deadline`` after the start of the last successful renewal."""
        return self.monotonic() < self._valid_until

    def remaining(self) -> float:
        """Seconds of leadership left (0 when not the leader)."""
        return max(0.0, self._valid_until - self.monotonic())

    def wait_leader(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds to be the leader."""
        with self._leading:
            return self._leading.wait_for(lambda: self.is_leader() or self._stop.is_set(), timeout) and (
                self.is_leader()
            )

    def status(self) -> dict:
        r = self.record
        return {
            "lease": f"{self.cfg.namespace}/{self.cfg.name}",
            "identity": self.cfg.identity,
            "leader": self.is_leader(),
            "state": self.state,
            "message": self.message,
            "holder": r.holder if r else None,
            "renew_time": r.renew_time if r else None,
            "transitions": r.transitions if r else None,
            "counters": dict(self.counters),
        }

    # --- the election thread --------------------------------------------------------------------

    def start(self) -> LeaderElector:
        self._thread.start()
        return self

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a bug must not end the election: no renewal means no leadership
                self.counters["errors"] += 1
                log.exception("lease %s: unexpected error", self.cfg.name)
            self._notice_lapse()
            period = self.cfg.retry_period
            # a candidate jitters its tries; the leader renews on time
            self._stop.wait(period if self.is_leader() else period * self.rng.uniform(1.0, 1.2))

    def stop(self, *, release: bool = True, timeout: float = 5.0) -> None:
        """End the election; a leader gives the Lease up (``release``)."""
        self._stop.set()
        with self._leading:
            self._leading.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._valid_until = 0.0
        if release:
            self._release()

    def _release(self) -> None:
        """Empty the Lease's holder if this replica holds it (by the record it
        last wrote or read: a write that was in flight when the stop came
        counts).  A conflict means the Lease moved on since: read it again
        and release once more if it is still ours."""
        for attempt in (1, 2):
            r = self.record
            if r is None or r.holder != self.cfg.identity:
                return
            try:
                body = release_object(self.cfg, self.clock(), r)
                self.client.request("PUT", self.cfg.path, body, timeout=self.request_timeout)
                log.info("lease %s released", self.cfg.name)
                return
            except ApiError as e:
                if e.status == 409 and attempt == 1:
                    try:
                        self.record = read_lease(self.client.get(self.cfg.path, timeout=self.request_timeout))
                        continue
                    except ApiError as e2:
                        e = e2
                log.warning(
                    "lease %s: not released (%s); another replica takes it when it expires", self.cfg.name, e
                )
                return

    def step(self) -> None:
        """One round: read the Lease, then acquire, renew or wait."""
        cfg = self.cfg
        try:
            current: LeaseRecord | None = read_lease(self.client.get(cfg.path, timeout=self.request_timeout))
        except ApiError as e:
            if e.status != 404:
                self._failed(f"cannot read lease {cfg.namespace}/{cfg.name}: {e}")
                return
            current = None
        now = self.monotonic()
        fp = current.fingerprint if current is not None else None
        if self._seen is None or self._seen[0] != fp:
            self._seen = (fp, now)
        self.record = current
        p = plan(cfg, current, self._seen[1], now, self.clock())
        if p.action == "wait":
            if (
                self.is_leader()
            ):  # someone else holds it now: we are not the leader, whatever our deadline says
                self._valid_until = 0.0
            self.state, self.message = "following", p.reason
            return
        assert p.body is not None
        sent = self.monotonic()
        try:
            if p.action == "create":
                got = self.client.request("POST", cfg.collection, p.body, timeout=self.request_timeout)
            else:
                got = self.client.request("PUT", cfg.path, p.body, timeout=self.request_timeout)
        except ApiError as e:
            if e.status == 409:
                self.counters["conflicts"] += 1
                self.state = "following" if not self.is_leader() else self.state
                self.message = (
                    f"another replica wrote lease {cfg.namespace}/{cfg.name} first; reading it again"
                )
                log.info("lease %s: conflict (%s); reading it again", cfg.name, e.reason or e.status)
                return
            self._failed(f"cannot write lease {cfg.namespace}/{cfg.name}: {e}")
            return
        self.record = read_lease(got)  # what stop() releases: this write's version, not the one read
        if self._stop.is_set():
            return  # stopping: do not become the leader now (stop() releases what it holds)
        self._valid_until = sent + cfg.renew_deadline
        self._seen = (self.record.fingerprint, self.monotonic())
        if p.acquires or not self._was_leader:
            self.counters["acquired"] += 1
            log.info(
                "lease %s/%s acquired by %s (transition %d)",
                cfg.namespace,
                cfg.name,
                cfg.identity,
                self.record.transitions,
            )
        else:
            self.counters["renewed"] += 1
        self._was_leader = True
        self.state, self.message = "leader", f"holding lease {cfg.namespace}/{cfg.name}"
        with self._leading:
            self._leading.notify_all()

    def _failed(self, message: str) -> None:
        self.counters["errors"] += 1
        left = self.remaining()
        if left > 0:
            message += f"; still the leader for {left:.1f}s unless a renewal succeeds"
        self.state, self.message = ("leader" if left > 0 else "error"), message
        log.warning("%s", message)

    def _notice_lapse(self) -> None:
        if self._was_leader and not self.is_leader():
            self._was_leader = False
            self.counters["lost"] += 1
            if self.state == "leader":
                self.state = "error"
            log.warning(
                "lease %s/%s: leadership lost (%s); no more signing until it is acquired again",
                self.cfg.namespace,
                self.cfg.name,
                self.message or "not renewed in time",
            )
            if self.on_lost is not None:
                self.on_lost()
