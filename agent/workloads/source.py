"""Where the agent's workloads come from: the :class:`WorkloadSource` interface
and the one place that builds a source from the agent's config.

A source hands the agent complete :class:`~agent.workloads.model.Inventory`
snapshots, never partial updates: a first one when the agent starts
(:meth:`WorkloadSource.start`), then each newer good one
(:meth:`WorkloadSource.poll`).  The agent diffs snapshots itself, so a
source only has to know how to build one.  When a new version of the
source's data is bad, the source keeps its last good snapshot, records the
error for :meth:`WorkloadSource.describe` and raises it from ``poll`` so the
agent can log it; the next ``poll`` returns None until the data changes.

Why poll rather than an async iterator: the agent applies workload changes
from its tick, in a worker thread, in order with identity and policy
changes (each may rewrite the proxy state).  A source that watches
something (the Kubernetes API's list+watch) runs its watch in its own
task or thread and keeps the newest snapshot; ``poll`` hands it over
without waiting.  :func:`changes` turns any source into an async iterator
for code that wants one.

Errors: ``start`` and ``poll`` raise :class:`~agent.yamlsrc.SourceError`
for data that does not validate (each problem with its place, e.g.
``file:line:column``) and :class:`OSError` when the source cannot be read
or reached (connection errors are OSErrors too).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent.workloads.model import Inventory

if TYPE_CHECKING:
    from agent.config import AgentConfig

__all__ = ["SourceStatus", "WorkloadSource", "changes", "source_from_config"]


@dataclass(frozen=True)
class SourceStatus:
    """What a source says about itself (``meshlet status``, logs)."""

    kind: str
    """``file`` (the YAML inventory) or ``kubernetes`` (the API)."""

    where: str
    """The file's path, or the API endpoint."""

    last_good: float | None = None
    """Unix time the current snapshot was loaded; None before the first."""

    error: str | None = None
    """Why the newest data was not applied (the last good snapshot stays), or None."""

    detail: Mapping[str, Any] | None = None
    """Source-specific, JSON-able: for ``kubernetes`` whether every watch is
    open (``in_sync``), since when it is not (``in_sync_at``, ``stale_s``),
    the kubelet cgroup driver and each resource's counters."""

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "kind": self.kind,
            "where": self.where,
            "last_good": self.last_good,
            "error": self.error,
        }
        if self.detail is not None:
            d["detail"] = dict(self.detail)
        return d


@runtime_checkable
class WorkloadSource(Protocol):
    """A supplier of inventory snapshots (see the module docstring)."""

    @property
    def where(self) -> str:
        """The path or endpoint, for messages ("cannot read inventory <where>")."""
        ...

    def start(self) -> Inventory:
        """The first snapshot; raises SourceError or OSError (the agent does not start)."""
        ...

    def poll(self) -> Inventory | None:
        """A newer good snapshot, or None when nothing changed.  Never waits.
        Bad new data: recorded, the last good snapshot kept, the error raised."""
        ...

    def describe(self) -> SourceStatus: ...

    def close(self) -> None:
        """Stop watching (a no-op for sources that only poll)."""
        ...


async def changes(source: WorkloadSource, interval: float) -> AsyncIterator[Inventory]:
    """Every newer good snapshot of an already started ``source``, checking
    every ``interval`` seconds in a worker thread; bad data is skipped (it
    is in ``source.describe().error``)."""
    while True:
        try:
            inv = await asyncio.to_thread(source.poll)
        except (OSError, ValueError):  # SourceError is a ValueError
            inv = None
        if inv is not None:
            yield inv
        await asyncio.sleep(interval)


def source_from_config(cfg: AgentConfig) -> WorkloadSource:
    """The workload source the config asks for (``workloads.source``): the
    YAML file at ``inventory:``, or the Kubernetes API (in-cluster, or
    ``workloads.kubeconfig``).  Raises KubeConfigError (a ValueError) when
    the Kubernetes client cannot be configured."""
    w = cfg.workloads
    if w.source == "kubernetes":
        from agent.workloads.kubeclient import KubeClient
        from agent.workloads.kubernetes import KubernetesSource

        client = (
            KubeClient.from_kubeconfig(w.kubeconfig, w.context) if w.kubeconfig else KubeClient.in_cluster()
        )
        return KubernetesSource(
            client,
            cfg.node,
            cgroup_root=w.kubelet_cgroup_root,
            sync_timeout=w.sync_timeout,
            watch_timeout=w.watch_timeout,
        )
    from agent.workloads.filesource import FileSource

    assert cfg.inventory is not None  # the config requires it for the file source
    return FileSource(cfg.inventory)
