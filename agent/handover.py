"""Two agents on one node: the hand-over lease (a DaemonSet rolling update
with ``maxSurge: 1``, where the new agent pod starts while the old one runs).

What two agents of one node share: the pinned datapath (programs, links and
maps in bpffs), the host's ports (the proxy listeners, which both agents'
workers bind with SO_REUSEPORT, and the metrics port), the cgroup tree and
the node's identity directory.  Each has its own run dir (an ``emptyDir``
per pod): state file, pid files, admin and CA sockets, logs.

Exactly one agent, the **owner**, writes the shared state: the kernel maps
(enrollment, the unknown-pod guard, tc links, kernel policy), the node's
intermediate CA files, and it serves the metrics port.  Who owns is written
in one small JSON file, ``<handoverDir>/handover.json``, read and replaced
only under an exclusive ``flock`` of ``handover.lock`` beside it, so a
claim and the old owner's check before each write never interleave.

Every agent registers in the file (``members``) with its role, whether its
proxy workers are ready, and its cgroups, and renews that entry every tick;
an entry not renewed for :data:`STALE_AFTER` seconds is dropped (its agent
crashed or hangs).  The roles:

- ``owner``: writes the shared state.  Its guard sync allows every live
  member's cgroups (a new agent pod sits among the pods' cgroups, where an
  unknown cgroup is refused) and then lists those members in ``allowed``.
- ``successor``: a newcomer that found a live owner.  It publishes its own
  proxy state but writes nothing shared; it starts its proxy workers once
  the owner lists it in ``allowed``, and claims the lease once every
  worker is ready (certificates loaded, listening beside the old ones) and
  it enforces the owner's policy version.  It claims at once when the
  owner is gone (stale or released).
- ``superseded``: a former owner after a claim.  It stops writing shared
  state and frees the metrics port; its workers keep serving until its
  SIGTERM, when they stop accepting (the kernel moves their queued
  connections to the new workers) and drain.  If its successor vanishes
  before that, it takes the node back.
- ``draining``: an agent that is stopping without owning the node (its
  workers finish their connections); it never claims.

If the successor dies before it claims, nothing shared changed: the owner
never stopped writing and its workers never stopped accepting.  (Its own
workers accept from the moment they are ready, up to a tick before the
claim: connections they hold then end with them, as in any crash.)

:func:`step` is the pure decision (tested without files); :class:`Lease`
is the file and the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .fsutil import write_atomic

__all__ = [
    "STALE_AFTER",
    "ROLES",
    "Member",
    "LeaseDoc",
    "Beat",
    "step",
    "resign",
    "Lease",
    "new_instance",
    "status_lines",
]

STALE_AFTER = 10.0
"""Seconds after which a member that has not renewed its entry is gone (the
agents renew every tick, 0.5 s)."""

ROLES = ("owner", "successor", "superseded", "draining")


def new_instance() -> str:
    """A name for this agent process, unique across the pods of a node (their
    pid namespaces differ, so a pid is not)."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Member:
    """One agent's entry in the lease file."""

    role: str
    ready: bool  # every proxy worker of this agent is ready (accepting)
    cgroups: tuple[str, ...]  # the agent's and its workers' cgroup dirs
    renewed: float  # time.time() of its last beat
    pod: str = ""  # for people: POD_NAME, or the host name and pid
    home: str = ""  # its run dir's device:inode: one per pod, the same after a container restart
    policy: str = ""  # the version of the policies it enforces

    def to_json(self) -> dict:
        return {
            "role": self.role,
            "ready": self.ready,
            "cgroups": list(self.cgroups),
            "renewed": self.renewed,
            "pod": self.pod,
            "home": self.home,
            "policy": self.policy,
        }


@dataclass(frozen=True)
class LeaseDoc:
    """The lease file's content."""

    owner: str | None = None
    epoch: int = 0  # +1 on every claim
    members: dict[str, Member] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()  # members whose cgroups the owner's guard allows

    def to_json(self) -> dict:
        return {
            "owner": self.owner,
            "epoch": self.epoch,
            "allowed": list(self.allowed),
            "members": {k: m.to_json() for k, m in sorted(self.members.items())},
        }

    @classmethod
    def from_json(cls, doc: object) -> LeaseDoc:
        """Lenient: a member entry that does not parse is left out (it is
        renewed by its agent within a tick)."""
        if not isinstance(doc, dict):
            return cls()
        members = {}
        for k, m in (doc.get("members") or {}).items():
            try:
                members[str(k)] = Member(
                    role=str(m["role"]),
                    ready=bool(m["ready"]),
                    cgroups=tuple(str(c) for c in m["cgroups"]),
                    renewed=float(m["renewed"]),
                    pod=str(m.get("pod", "")),
                    home=str(m.get("home", "")),
                    policy=str(m.get("policy", "")),
                )
            except (KeyError, TypeError, ValueError):
                continue
        owner = doc.get("owner")
        epoch = doc.get("epoch")
        return cls(
            owner=str(owner) if owner else None,
            epoch=epoch if isinstance(epoch, int) else 0,
            members=members,
            allowed=tuple(str(a) for a in doc.get("allowed") or ()),
        )


@dataclass(frozen=True)
class Beat:
    """What one agent reports on a tick."""

    instance: str
    role: str  # its role before this beat
    ready: bool
    cgroups: tuple[str, ...]
    pod: str = ""
    home: str = ""  # see Member.home
    policy: str = ""  # see Member.policy
    admitted: tuple[str, ...] | None = None  # owner only: members its last guard sync allowed
    leaving: bool = False  # the agent is stopping: drop its entry (and ownership)


def step(doc: LeaseDoc, beat: Beat, now: float) -> tuple[LeaseDoc, str]:
    """The lease after ``beat`` at ``now``, and the agent's role from now on.

    Pure.  Stale members are dropped first, and so are other entries with
    the beating agent's ``home`` (its run dir: a previous process of the same
    pod, which is dead since only one agent runs per run dir); an owner that
    is no longer a member leaves the lease free.  Then:

    - leaving: the entry goes, and the ownership with it (a restarted agent
      claims at once);
    - no owner: the beating agent claims (whatever its role: someone must
      write the shared state, and an agent alone on its node does);
    - another owner: an owner or superseded agent is ``superseded``; a
      successor claims once it is ``ready``, ``allowed`` and enforces the
      owner's policy version (a successor that lacks the owner's policies
      must not take over: that would weaken what is enforced), else stays
      ``successor``;
    - it owns: it stays ``owner`` and publishes ``admitted`` as ``allowed``;
    - a ``draining`` agent stays ``draining``: it never claims.
    """
    members = {
        k: m
        for k, m in doc.members.items()
        if now - m.renewed <= STALE_AFTER and (k == beat.instance or not beat.home or m.home != beat.home)
    }
    owner = doc.owner if doc.owner in members else None
    epoch, allowed = doc.epoch, doc.allowed
    if beat.leaving:
        members.pop(beat.instance, None)
        if owner == beat.instance:
            owner, allowed = None, ()
        return LeaseDoc(owner, epoch, members, tuple(a for a in allowed if a in members)), "leaving"
    if beat.role == "draining" and owner != beat.instance:
        role = "draining"
    elif owner is None or owner == beat.instance:
        role = "owner"
        if owner is None:
            owner, epoch, allowed = beat.instance, epoch + 1, ()
    elif beat.role == "successor":
        if beat.ready and beat.instance in allowed and members[owner].policy == beat.policy:
            owner, epoch, allowed, role = beat.instance, epoch + 1, (), "owner"
        else:
            role = "successor"
    else:
        role = "superseded"
    if role == "owner" and beat.admitted is not None:
        allowed = tuple(sorted(a for a in beat.admitted if a in members or a == beat.instance))
    members[beat.instance] = Member(role, beat.ready, beat.cgroups, now, beat.pod, beat.home, beat.policy)
    return LeaseDoc(owner, epoch, members, tuple(a for a in allowed if a in members)), role


def resign(doc: LeaseDoc, instance: str, now: float) -> tuple[LeaseDoc, str]:
    """``instance`` gives the lease back (it took it but could not take the
    node over, e.g. its datapath would not load): the lease is free, so the
    superseded agent takes the node back on its next beat; ``instance``
    stays a member, as a successor that is not ready."""
    members = dict(doc.members)
    m = members.get(instance)
    if m is not None:
        members[instance] = Member("successor", False, m.cgroups, now, m.pod, m.home, m.policy)
    if doc.owner != instance:
        return replace(doc, members=members), "successor"
    return LeaseDoc(None, doc.epoch, members, ()), "successor"


class Lease:
    """The lease file of one node, shared by its agents (see the module
    docstring).  ``directory`` must be the same for every agent of the node
    (``handoverDir``: a hostPath in Kubernetes)."""

    def __init__(self, directory: str, instance: str | None = None) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "handover.json")
        self.lock_path = os.path.join(directory, "handover.lock")
        self.instance = instance or new_instance()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> LeaseDoc:
        try:
            with open(self.path) as f:
                return LeaseDoc.from_json(json.load(f))
        except FileNotFoundError:
            return LeaseDoc()
        except (OSError, ValueError):
            return LeaseDoc()  # unreadable: treated as free; the next beat rewrites it

    def update(self, fn: Callable[[LeaseDoc], tuple[LeaseDoc, str]]) -> tuple[LeaseDoc, str]:
        """Read, apply ``fn``, write back, all under the lock; returns what
        ``fn`` returned.  ``fn`` runs under the lock, so the caller can do the
        work that must not interleave with a claim there."""
        with self.locked():
            doc, role = fn(self.read())
            write_atomic(self.path, json.dumps(doc.to_json(), indent=1) + "\n")
            return doc, role

    def beat(self, beat: Beat) -> tuple[LeaseDoc, str]:
        return self.update(lambda doc: step(doc, beat, time.time()))

    def resign(self) -> tuple[LeaseDoc, str]:
        return self.update(lambda doc: resign(doc, self.instance, time.time()))

    def describe(self, role: str) -> dict:
        """For ``meshlet status``: this agent's role and the lease as it is."""
        doc = self.read()
        now = time.time()
        return {
            "instance": self.instance,
            "role": role,
            "lease": self.path,
            "owner": doc.owner,
            "epoch": doc.epoch,
            "members": {
                k: {**m.to_json(), "age_s": round(now - m.renewed, 1)} for k, m in sorted(doc.members.items())
            },
        }


def status_lines(ho: dict | None) -> list[str]:
    """``meshlet status`` lines for the ``handover`` section of /v1/status:
    nothing while the agent is alone on its node and owns it."""
    if not ho:
        return []
    members = ho.get("members") or {}
    me = ho.get("instance")
    if ho.get("role") == "owner" and set(members) <= {me} and not ho.get("takeover_error"):
        return []
    out = [
        f"hand-over: this agent ({me}) is {ho.get('role')}; owner {ho.get('owner') or 'none'}, "
        f"epoch {ho.get('epoch')} ({ho.get('lease')})"
    ]
    if ho.get("takeover_error"):
        out.append(f"  {ho['takeover_error']}")
    for k, m in members.items():
        if k == me:
            continue
        out.append(
            f"  agent {k} ({m.get('pod') or '?'}): {m.get('role')}, workers "
            f"{'ready' if m.get('ready') else 'not ready'}, seen {m.get('age_s')}s ago"
        )
    return out
