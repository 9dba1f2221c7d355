"""The proxy's view of the applied authorization policies (issue #4, L4 part).

The agent writes ``policies.json`` next to the proxy state file (shape in
``agent.policy.store``).  ``PolicyWatcher`` polls it with the shared
``FileWatcher`` (agent/proxy/watch.py) and rebuilds the ``PolicySet`` from
the compiled data the agent validated (``agent.policy.compiled``; a file
from an older agent: from the embedded YAML), checking that the version it
gets is the one the file names.  The load runs in a worker thread and also
builds the rule index of every pod of this node (``warm``), so a reload of
10,000 rules never stalls the worker's event loop; the new set replaces the
old in one step.  A file that does not load is logged and the previous set
is kept; no file means no policies (everything allowed, as without the mesh).

``authorize`` builds the connection-level ``Request`` (``is_http=False``) and
asks ``evaluate``: ALLOW rules with HTTP-only fields never widen, DENY/AUDIT
rules with them apply to every connection their L4 part matches (Istio's TCP
semantics, implemented by the evaluator).  Only the destination side calls
it, where the source identity is trustworthy: the verified mTLS peer, or the
kernel's cgroup record on the same node.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

from agent.gcutil import gc_paused
from agent.identity.spiffe import SpiffeIdError, parse_spiffe_id
from agent.policy.canon import fingerprint
from agent.policy.compiled import COMPILED_FILE, COMPILED_FORMAT, CompiledError, from_data
from agent.policy.compiled import FORMAT as DATA_FORMAT
from agent.policy.evaluate import Decision, Request, evaluate, workload_index
from agent.policy.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, PolicySet
from agent.proxy.state import Pod
from agent.proxy.watch import FileWatcher

__all__ = ["PolicyWatcher", "PolicyFileError", "authorize", "load_policy_file", "policy_path", "warm"]

log = logging.getLogger("meshlet.proxy")


class PolicyFileError(ValueError):
    pass


def policy_path(state_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), COMPILED_FILE)


def empty_set(
    trust_domain: str = DEFAULT_TRUST_DOMAIN, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> PolicySet:
    return PolicySet((), trust_domain, root_namespace, fingerprint((), trust_domain, root_namespace))


def load_policy_file(path: str) -> PolicySet:
    """Read ``policies.json``.  Raises PolicyFileError (or OSError)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PolicyFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != COMPILED_FORMAT:
        raise PolicyFileError(f"{path}: expected an object with format {COMPILED_FORMAT}")
    td, rn, text, version = (
        doc.get("trustDomain"),
        doc.get("rootNamespace"),
        doc.get("yaml"),
        doc.get("version"),
    )
    if not (
        isinstance(td, str) and isinstance(rn, str) and isinstance(text, str) and isinstance(version, str)
    ):
        raise PolicyFileError(f"{path}: trustDomain, rootNamespace, yaml and version must be strings")
    data = doc.get("policies")
    if doc.get("compiledFormat") == DATA_FORMAT and isinstance(data, list):
        try:
            return from_data(data, trust_domain=td, root_namespace=rn, version=version, where=path)
        except CompiledError as e:
            raise PolicyFileError(str(e)) from None
    if text.strip():
        # a file without compiled policies (an agent from before they were
        # published): the YAML front end, loaded only for this
        from agent.policy.load import parse_policies

        try:
            ps = parse_policies(text, path, trust_domain=td, root_namespace=rn)
        except ValueError as e:  # SourceError
            raise PolicyFileError(f"{path}: the embedded policies do not load: {e}") from None
    else:
        ps = empty_set(td, rn)
    if ps.version != version:
        raise PolicyFileError(
            f"{path}: the embedded policies have version {ps.version}, but the file "
            f"says {version} (is the agent from the same release?)"
        )
    return ps


def _describe(ps: PolicySet) -> str:
    return f"version {ps.version} ({len(ps)} policies)"


def warm(ps: PolicySet, workloads: Iterable[tuple[str, Mapping[str, str]]]) -> PolicySet:
    """Build ``ps``'s rule index for each (namespace, labels) now, so the first
    request to each pod after a reload does not build it on the event loop."""
    for namespace, labels in workloads:
        workload_index(ps, namespace, labels)
    return ps


#: Seconds between checks of ``policies.json`` (a stat; the load itself runs
#: in a thread).  Short, because it is part of every apply's time to
#: enforcement: `meshlet policy apply` of 10,000 rules waited 0.25 s on
#: average at the former 0.5 s.
POLL_INTERVAL = 0.1


class PolicyWatcher(FileWatcher[PolicySet]):
    """Polls ``policies.json`` and keeps the last good ``PolicySet``
    (agent/proxy/watch.py).  Loads once at construction; no file is the empty set.

    ``workloads()``: the (namespace, labels) of this node's pods, whose rule
    indexes a load builds before the set is swapped in (see :func:`warm`)."""

    def __init__(
        self, path: str, workloads: Callable[[], Iterable[tuple[str, Mapping[str, str]]]] = tuple
    ) -> None:
        self.workloads = workloads
        self.last_load: dict[str, float] = {}
        """Wall and (loader thread) CPU ms of the last good load, for the worker's stats."""
        super().__init__(
            path,
            self._load_and_warm,
            empty_set(),
            what="authorization policies",
            errors=(OSError, PolicyFileError),
            missing=lambda old: empty_set(old.trust_domain, old.root_namespace),
            version=lambda ps: ps.version,
            describe=_describe,
            interval=POLL_INTERVAL,
        )
        self.check()

    def _load_and_warm(self, path: str) -> PolicySet:
        # The collector paused while the set is built (as the agent's store
        # does): its full collections walked the growing set again and again
        # (a 10,000-rule reload: 1.9 s -> 0.6 s).  The event loop's own
        # garbage is still freed by reference counting meanwhile.
        wall, cpu = time.perf_counter(), time.thread_time()
        with gc_paused():
            ps = warm(load_policy_file(path), self.workloads())
        self.last_load = {
            "ms": round((time.perf_counter() - wall) * 1000, 1),
            "cpu_ms": round((time.thread_time() - cpu) * 1000, 1),
        }
        return ps


def authorize(
    ps: PolicySet, *, src_identity: str | None, src_ip: str | None, dst: Pod, port: int
) -> Decision:
    """Decide one connection to pod ``dst`` on ``port``.  ``src_identity`` must
    be trustworthy (verified mTLS peer, or the kernel's record on this node);
    None is a peer without an identity."""
    principal = None
    if src_identity:
        try:
            principal = parse_spiffe_id(src_identity)
        except SpiffeIdError:
            principal = None
    ip = None
    if src_ip:
        try:
            ip = ipaddress.ip_address(src_ip)
        except ValueError:
            ip = None
    req = Request(
        destination_namespace=dst.namespace,
        destination_labels=dst.label_map,
        destination_port=port,
        source_principal=principal,
        source_ip=ip,
        is_http=False,
    )
    return evaluate(ps, req)
