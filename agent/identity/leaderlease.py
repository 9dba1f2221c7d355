"""Leader election on a ``coordination.k8s.io/v1`` Lease: the decisions.
Pure: no API client, no clock (times are passed in); the I/O shell is
:class:`agent.identity.leader.LeaderElector`.

The rules (those of client-go's ``leaderelection``, which every
Kubernetes controller follows, so an operator reads the Lease the usual way:
``kubectl -n meshlet-system get lease meshlet-ca -o yaml``):

- The Lease's ``spec.holderIdentity`` is the leader; it rewrites
  ``spec.renewTime`` every ``retry_period``.  A candidate takes the Lease
  only when it is free (no holder, e.g. released by a leader that stopped)
  or when it has seen the same record, unchanged, for a whole
  ``leaseDurationSeconds`` *on its own monotonic clock* -- never by
  comparing ``renewTime`` with its wall clock, so clock skew between
  replicas cannot hand the Lease over early.
- A take-over sets ``acquireTime`` and increments ``leaseTransitions``; a
  renewal keeps both.  Every write is a PUT carrying the
  ``metadata.resourceVersion`` just read: when another replica wrote in
  between, the API answers 409 Conflict, and this replica has simply lost
  that round (it reads again next round).
- A leader is the leader only until ``renew_deadline`` after the start of
  its last *successful* renewal, measured from *before* the request was
  sent.  Others wait ``lease_duration`` after they *saw* that renewal,
  which was written after it was sent, so with ``renew_deadline <
  lease_duration`` a leader that cannot renew (API away, partition, stuck
  thread) has stopped acting before anyone else may start
  (``lease_duration - renew_deadline`` is the margin for clock-rate drift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "LeaseConfig",
    "LeaseRecord",
    "Plan",
    "read_lease",
    "plan",
    "micro_time",
    "lease_object",
    "release_object",
]

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class LeaseConfig:
    """Where the Lease is and how long a leader keeps it."""

    identity: str
    """This replica's name in ``holderIdentity`` (unique per process: a
    restarted process must not pass for the one before it)."""
    name: str = "meshlet-ca"
    namespace: str = "meshlet-system"
    lease_duration: float = 15.0
    """Seconds a candidate waits after it last saw the record change."""
    renew_deadline: float = 10.0
    """Seconds after the start of its last successful renewal that a leader stops acting."""
    retry_period: float = 2.0
    """Seconds between tries (to acquire, or to renew)."""

    def __post_init__(self) -> None:
        if not self.identity or len(self.identity) > 128:
            raise ValueError(f"the lease holder identity {self.identity!r} must be 1..128 characters")
        for what, v in (("name", self.name), ("namespace", self.namespace)):
            if not _NAME.fullmatch(v):
                raise ValueError(f"lease {what} {v!r} is not a Kubernetes object name")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"lease timings must satisfy 0 < retry period ({self.retry_period:g}s) < renew deadline "
                f"({self.renew_deadline:g}s) < lease duration ({self.lease_duration:g}s): a leader must "
                "stop before another replica may take the lease"
            )
        if int(self.lease_duration) != self.lease_duration:
            raise ValueError(f"the lease duration ({self.lease_duration:g}s) must be whole seconds")

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    @property
    def collection(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says (``spec``), plus its ``metadata.resourceVersion``."""

    holder: str
    duration: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int
    resource_version: str

    @property
    def fingerprint(self) -> tuple:
        """What a change of means "the holder is alive" (the resourceVersion alone
        would also change on a label edit; the record is what counts)."""
        return (self.holder, self.duration, self.acquire_time, self.renew_time, self.transitions)


@dataclass(frozen=True)
class Plan:
    """What to do this round.  ``action``: ``create`` (POST ``body``),
    ``update`` (PUT ``body``: acquire or renew), ``wait`` (another replica
    holds a live lease: ``reason`` says whose and until when)."""

    action: str
    body: dict | None = None
    reason: str = ""
    acquires: bool = False
    """True when this write makes this replica the holder (it was not before)."""


def micro_time(t: datetime) -> str:
    """A ``metav1.MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_lease(obj: dict) -> LeaseRecord:
    """The record of a Lease object as the API served it."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


def lease_object(cfg: LeaseConfig, now: datetime, old: LeaseRecord | None) -> dict:
    """The Lease that makes (or keeps) ``cfg.identity`` the holder."""
    renewing = old is not None and old.holder == cfg.identity
    spec = {
        "holderIdentity": cfg.identity,
        "leaseDurationSeconds": int(cfg.lease_duration),
        "acquireTime": (old.acquire_time if renewing and old is not None else None) or micro_time(now),
        "renewTime": micro_time(now),
        "leaseTransitions": (old.transitions if old is not None else 0)
        + (0 if renewing or old is None else 1),
    }
    meta: dict = {
        "name": cfg.name,
        "namespace": cfg.namespace,
        "labels": {"app.kubernetes.io/part-of": "meshlet", "app.kubernetes.io/name": "meshlet-ca"},
    }
    if old is not None:
        meta["resourceVersion"] = old.resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def release_object(cfg: LeaseConfig, now: datetime, old: LeaseRecord) -> dict:
    """The Lease a leader writes when it stops on purpose: no holder, so a
    candidate takes it at once instead of waiting the lease out."""
    body = lease_object(cfg, now, old)
    body["spec"].update(
        {"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": old.transitions}
    )
    return body


def plan(
    cfg: LeaseConfig,
    current: LeaseRecord | None,
    seen_since: float | None,
    now_mono: float,
    now: datetime,
) -> Plan:
    """This round's move.  ``current``: the Lease as just read (None: there
    is none); ``seen_since``: the monotonic time this replica first saw that
    exact record (:attr:`LeaseRecord.fingerprint`); ``now_mono``/``now``:
    the monotonic and wall clocks now."""
    if current is None:
        return Plan("create", lease_object(cfg, now, None), acquires=True)
    if current.holder == cfg.identity:
        return Plan("update", lease_object(cfg, now, current))
    if current.holder:
        duration = current.duration if current.duration > 0 else cfg.lease_duration
        since = now_mono if seen_since is None else seen_since
        left = since + duration - now_mono
        if left > 0:
            return Plan(
                "wait",
                reason=(
                    f"{current.holder} holds lease {cfg.namespace}/{cfg.name} "
                    f"(renewed {current.renew_time}); taking over if it is not renewed within {left:.1f}s"
                ),
            )
    return Plan("update", lease_object(cfg, now, current), acquires=True)
