"""The agent's policy store: the applied policies, persisted under runDir.

The store holds every applied document -- ``AuthorizationPolicy`` and the
other kinds it is given (the agent gives it ``TrafficPolicy``, see
:data:`agent.traffic.trafficpolicy.TRAFFIC_KIND`; this package does not import
agent.traffic) -- and, for every one, its source document (normalized:
re-dumped YAML, so comments and formatting are not kept, as with
``kubectl get -o yaml``).  Documents are keyed by kind/namespace/name: an
AuthorizationPolicy and a TrafficPolicy may share a name.

One store, one version: :attr:`PolicyStore.version` is a fingerprint of the
meaning of everything stored.  With no documents of the other kinds it is the
authorization :class:`~.model.PolicySet`'s version; otherwise a hash of the
per-kind versions.

Files in ``run_dir`` (each written atomically: temp file, fsync, rename):

``policies.yaml``
    The source of truth: every stored document, AuthorizationPolicies first,
    then each other kind, each sorted by namespace/name, separated by ``---``,
    after a ``# meshlet policy store: version V`` comment.  A restarted agent
    reloads it (and refuses to start if it does not load).

``policies.json``
    The compiled authorization set, for the proxy workers (they poll it like
    ``proxy-state.json``).  Written after ``policies.yaml``, and rewritten
    from it at load, so it never lags behind for long::

        {
          "format": 1,
          "version": "<PolicySet.version>",    # hash of the meaning
          "trustDomain": "cluster.local",
          "rootNamespace": "istio-system",
          "count": 6,                           # documents: policies and RequestAuthentications
          "yaml": "<the AuthorizationPolicy and RequestAuthentication documents of policies.yaml>",
                                                 # parse_policies(yaml) gives the set back
          "compiledFormat": 1,
          "policies": [                          # the same set as data (agent/policy/compiled.py):
            {"namespace": "shop", "name": "deny-admin", "action": "DENY",   # the proxies rebuild
             "selector": {"app": "backend"}, "rules": [...]}]   # it without parsing YAML; a reader
        }                                                       # checks the version it gets

``traffic.json`` (one file per other kind: ``DocKind.published``)
    What ``DocKind.compile`` makes of that kind's documents; for
    TrafficPolicy: ``{"format": 1, "kind": "TrafficPolicy", "version",
    "count", "yaml", "policies": [summary...]}``, read back by the proxy's
    ``TrafficWatcher`` (agent/proxy/watch.py).  Always written, empty
    included, so a reader never sees a stale set after a delete.  A published
    file is rewritten only when its content changes, so a change of one kind
    does not make the proxies reload the other.

Operations are atomic: :meth:`PolicyStore.apply` parses every document of
every source first; one bad document of any kind raises
:class:`~agent.yamlsrc.SourceError` (``file:line:column: field: what``) and
changes nothing.  It creates or replaces documents by kind/namespace/name; it
never deletes (that is :meth:`PolicyStore.delete`).  :meth:`PolicyStore.replace_all`
makes the store hold exactly the documents given (none included): creations,
changes and deletions in one commit, so one new version and one rewrite of
each file -- what a watcher of the cluster's policies needs after a relist or
a burst of events.

Size: one apply takes at most :data:`MAX_DOCUMENT_BYTES` of source text
(the admin API's upload limit too); a replace-all, being the whole set, at
most ``max_bytes`` (default the same 4 MiB, up to :data:`MAX_STORE_BYTES`:
every proxy worker reads the whole published set on each change, so the
bound is kept).  Over it, :class:`StoreFull` names the size and the limit and
nothing changes: the previous set stays in force.  The store is not
thread-safe: the caller runs one operation at a time (the agent holds a lock
around it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from .. import yamlsrc as y
from ..fsutil import write_atomic
from .compiled import COMPILED_FILE, COMPILED_FORMAT, policies_to_data
from .compiled import FORMAT as compiled_format
from .load import (
    AUTHN_KIND,
    KIND,
    DocKind,
    _check_options,
    collect_documents,
    policy_kinds,
    policy_set,
)
from .model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, PolicySet

__all__ = [
    "PolicyStore",
    "Change",
    "Ambiguous",
    "store_version",
    "STORE_FILE",
    "COMPILED_FILE",
    "MAX_DOCUMENT_BYTES",
    "MAX_STORE_BYTES",
    "StoreFull",
]

STORE_FILE = "policies.yaml"
#: Upper bound on the source text of one apply/diff (the admin API enforces it too).
MAX_DOCUMENT_BYTES = 4 << 20
#: The most ``PolicyStore(max_bytes=...)`` may allow for a whole set.
MAX_STORE_BYTES = 64 << 20

CREATED, CONFIGURED, UNCHANGED, DELETED = "created", "configured", "unchanged", "deleted"

_STR_TAG = "tag:yaml.org,2002:str"

Key = tuple[str, str, str]
"""(kind, namespace, name)"""


@dataclass(frozen=True)
class Change:
    namespace: str
    name: str
    result: str
    """created | configured | unchanged | deleted"""
    kind: str = KIND

    def to_dict(self) -> dict:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name, "result": self.result}


class StoreFull(y.SourceError):
    """A whole set larger than the store takes (:meth:`PolicyStore.replace_all`);
    nothing was changed.  ``size``, ``limit``: bytes of source text."""

    def __init__(self, what: str, size: int, documents: int, limit: int, version: str):
        self.size, self.limit, self.documents = size, limit, documents
        super().__init__(
            [
                y.Problem(
                    what,
                    0,
                    0,
                    "",
                    f"{size} bytes of policy text in {documents} documents; the policy store's limit is "
                    f"{limit} bytes (workloads.maxPolicyBytes, at most {MAX_STORE_BYTES}); nothing changed, "
                    f"the previous set (version {version}) stays in force",
                )
            ]
        )


class Ambiguous(LookupError):
    """A namespace/name that documents of several kinds have; say which kind."""

    def __init__(self, namespace: str, name: str, kinds: Sequence[str]):
        self.kinds = list(kinds)
        super().__init__(
            f"{namespace}/{name} names documents of several kinds "
            f"({', '.join(kinds)}); say which one (--kind, or KIND/NAME)"
        )


def _dump(doc: dict) -> str:
    """Block-style YAML of a document's plain data, keys in their order.

    A small emitter of its own for what policy documents hold (mappings,
    lists, strings, integers, booleans, null): PyYAML's representer took
    about a quarter of a 10,000-rule apply.  A string is written plain when
    it is made of safe characters and reads back as that string; else
    double-quoted (JSON's escapes of ASCII are YAML's).  Anything else in
    the data (a float, a timestamp, a string beyond ASCII) goes through
    PyYAML.  Round trip checked by
    Hypothesis in tests/unit/test_policy_reload.py."""
    try:
        return "\n".join(_block(doc)) + "\n"
    except _NotPlain:
        return y.dump_plain(doc)


class _NotPlain(Exception):
    pass


_PLAIN_STR = re.compile(r"[A-Za-z0-9_/.][A-Za-z0-9_./*@+-]*\Z")
_RESOLVER = Resolver()


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        if _PLAIN_STR.match(v) and _RESOLVER.resolve(ScalarNode, v, (True, False)) == _STR_TAG:
            return v
        if not v.isascii() or "\x7f" in v:
            raise _NotPlain  # YAML's escapes beyond ASCII differ from JSON's (surrogates)
        return json.dumps(v)  # JSON's escapes of ASCII are YAML's: a double-quoted scalar
    if v is None:
        return "null"
    if v is True or v is False:
        return "true" if v else "false"
    if type(v) is int:
        return str(v)
    if isinstance(v, dict) and not v:
        return "{}"
    if isinstance(v, list) and not v:
        return "[]"
    raise _NotPlain


def _block(v: Any) -> list[str]:
    """Lines of a non-empty mapping or list, at indentation 0."""
    lines: list[str] = []
    if isinstance(v, dict):
        for k, x in v.items():
            key = _scalar(k)
            if isinstance(x, (dict, list)) and x:
                lines.append(key + ":")
                sub = _block(x)
                lines += ["  " + ln for ln in sub] if isinstance(x, dict) else sub
            else:
                lines.append(f"{key}: {_scalar(x)}")
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, (dict, list)) and x:
                sub = _block(x)
                lines.append("- " + sub[0])
                lines += ["  " + ln for ln in sub[1:]]
            else:
                lines.append("- " + _scalar(x))
    else:
        raise _NotPlain
    return lines


def _header(version: str) -> str:
    return f"# meshlet policy store: version {version}\n"


def store_version(authorization: str, others: dict[str, tuple[str, int]]) -> str:
    """The one version of a store: ``authorization`` (the PolicySet's version)
    when no other kind has documents; else a hash over every kind's version.
    ``others``: kind -> (version, count)."""
    if not any(count for _, count in others.values()):
        return authorization
    body = json.dumps({KIND: authorization, **{k: v for k, (v, _) in others.items()}}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


# _GC_NOTE: every operation runs with the cyclic garbage collector paused
# (agent.yamlsrc.gc_paused): a 10,000-rule set is a few hundred thousand small
# objects, and with the collector on, its full collections walked them again
# and again while the set was built, compiled and fingerprinted (measured: a
# 10,000-rule apply 2.7 s -> 1.8 s).  Reference counting still frees garbage.


def _order(key: Key) -> tuple:
    return (key[0] not in _SET_KINDS, key)


#: The kinds in the authorization PolicySet (and policies.json).
_SET_KINDS = (KIND, AUTHN_KIND)


class PolicyStore:
    """See the module docstring.  ``run_dir=None`` keeps everything in memory.
    ``kinds``: the document kinds stored besides AuthorizationPolicy."""

    def __init__(
        self,
        run_dir: str | None,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        kinds: Sequence[DocKind] = (),
        max_bytes: int = MAX_DOCUMENT_BYTES,
    ):
        _check_options(trust_domain, root_namespace)
        if not 0 < max_bytes <= MAX_STORE_BYTES:
            raise ValueError(f"the policy store's limit must be 1..{MAX_STORE_BYTES} bytes, not {max_bytes}")
        self.max_bytes = max_bytes
        self.run_dir = run_dir
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.kinds = {k.kind: k for k in kinds}
        if KIND in self.kinds or any(k.compile is None or not k.published for k in kinds):
            raise ValueError(f"extra kinds need `published` and `compile`, and are not {KIND}")
        self._docs: dict[Key, dict] = {}
        self._texts: dict[Key, str] = {}
        self._objs: dict[Key, Any] = {}
        self._published: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        """Stages of the last apply: {stage: {"ms": wall, "cpu_ms": this thread's CPU}};
        see :meth:`_stage`."""
        self.policyset, self.sets, self.version = self._build({}, {})

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Time one stage of an operation into :attr:`timings` (wall and
        thread CPU: on a loaded machine the two differ, and the CPU time is
        what the code costs).  Stages: parse (YAML -> checked documents),
        plan (compare with the store, YAML of the changed documents),
        compile (the sets and their versions), write (policies.yaml and the
        published files)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.timings[name] = {
                "ms": round((time.perf_counter() - wall) * 1000, 1),
                "cpu_ms": round((time.thread_time() - cpu) * 1000, 1),
            }

    # --- paths ------------------------------------------------------------------------

    @property
    def store_path(self) -> str | None:
        return os.path.join(self.run_dir, STORE_FILE) if self.run_dir else None

    @property
    def compiled_path(self) -> str | None:
        return os.path.join(self.run_dir, COMPILED_FILE) if self.run_dir else None

    def published_path(self, kind: str) -> str | None:
        """Where the proxies read ``kind`` (AuthorizationPolicy: policies.json)."""
        if not self.run_dir:
            return None
        return self.compiled_path if kind == KIND else os.path.join(self.run_dir, self.kinds[kind].published)

    @property
    def count(self) -> int:
        """Documents of every kind."""
        return len(self._texts)

    # --- pure helpers -----------------------------------------------------------------

    def _doc_kinds(self) -> list[DocKind]:
        return [*policy_kinds(self.trust_domain), *self.kinds.values()]

    def _text(self, texts: dict[Key, str], kind: str | tuple[str, ...] | None = None) -> str:
        kinds = (kind,) if isinstance(kind, str) else kind
        return "---\n".join(texts[k] for k in sorted(texts, key=_order) if kinds is None or k[0] in kinds)

    def _collect(self, sources: Sequence[tuple[str, str]], plain: list | None = None) -> dict[str, tuple]:
        return collect_documents(sources, self._doc_kinds(), plain=plain)

    def _build(self, texts: dict[Key, str], objs: dict[Key, Any]) -> tuple[PolicySet, dict[str, dict], str]:
        """(authorization set, {kind: published document} for the other kinds,
        store version) of the documents ``texts`` and their read objects
        ``objs``.  Nothing is parsed again, except the documents of kinds
        with a cross-document check (``DocKind.conflict``, e.g. two
        TrafficPolicies for one service port): those are read again together,
        so a batch cannot conflict with what is stored (raises SourceError)."""
        ps = policy_set(
            [o for k, o in objs.items() if k[0] == KIND],
            self.trust_domain,
            self.root_namespace,
            authentications=[o for k, o in objs.items() if k[0] == AUTHN_KIND],
        )
        sets = {}
        for kind, dk in self.kinds.items():
            assert dk.compile is not None
            text = self._text(texts, kind)
            if dk.conflict is not None and text:
                kobjs = collect_documents([(STORE_FILE, text)], [dk])[kind]
            else:
                kobjs = tuple(
                    sorted((o for k, o in objs.items() if k[0] == kind), key=lambda o: (o.namespace, o.name))
                )
            sets[kind] = dk.compile(tuple(kobjs), text)
        version = store_version(ps.version, {k: (d["version"], d["count"]) for k, d in sets.items()})
        return ps, sets, version

    def _parse(
        self, sources: Sequence[tuple[str, str]], *, whole: str | None = None
    ) -> tuple[dict[Key, dict], dict[Key, Any]]:
        """Validate and read every source once (raises SourceError naming
        file:line:column): (each document as plain data, each as the object
        its kind's reader made), keyed by kind/namespace/name.  ``whole``:
        the sources are a whole set of that name (may be empty; limit
        ``max_bytes``, else StoreFull)."""
        sources = list(sources)
        total = sum(len(t.encode()) for _, t in sources)
        if whole is not None:
            if total > self.max_bytes:
                raise StoreFull(whole, total, len(sources), self.max_bytes, self.version)
            if not sources:
                return {}, {}
        elif not sources:
            raise y.SourceError([y.Problem("<input>", 0, 0, "", "no policy documents given")])
        elif total > MAX_DOCUMENT_BYTES:
            raise y.SourceError(
                [
                    y.Problem(
                        sources[0][0],
                        0,
                        0,
                        "",
                        f"{total} bytes of policy text; the limit is {MAX_DOCUMENT_BYTES}",
                    )
                ]
            )
        plain: list[dict] = []
        got = self._collect(sources, plain)
        objs = {(kind, o.namespace, o.name): o for kind, found in got.items() for o in found}
        docs: dict[Key, dict] = {}
        for doc in plain:
            meta = doc["metadata"]
            docs[(doc["kind"], meta["namespace"], meta["name"])] = doc
        return docs, objs

    def _plan(
        self, sources: Sequence[tuple[str, str]]
    ) -> tuple[tuple[dict[Key, str], dict[Key, dict], dict[Key, Any]], list[Change]]:
        """((texts, docs, objects) of the store after applying ``sources``, the changes)."""
        with self._stage("parse"):
            new, objs = self._parse(sources)
        with self._stage("plan"):
            return self._merge(new, objs)

    def _merge(
        self, new: dict[Key, dict], objs: dict[Key, Any]
    ) -> tuple[tuple[dict[Key, str], dict[Key, dict], dict[Key, Any]], list[Change]]:
        texts, docs, merged = dict(self._texts), dict(self._docs), dict(self._objs)
        changes = []
        for key in sorted(new, key=_order):
            old = self._docs.get(key)
            # same data (key order, quoting, comments aside): unchanged, stored text kept
            result = CREATED if old is None else UNCHANGED if old == new[key] else CONFIGURED
            changes.append(Change(key[1], key[2], result, key[0]))
            if result != UNCHANGED:
                texts[key] = _dump(new[key])
                docs[key] = new[key]
                merged[key] = objs[key]
        return (texts, docs, merged), changes

    def _keys(self, namespace: str, name: str, kind: str | None) -> list[Key]:
        return [
            k
            for k in sorted(self._texts, key=_order)
            if k[1:] == (namespace, name) and (kind is None or k[0] == kind)
        ]

    def _key(self, namespace: str, name: str, kind: str | None) -> Key | None:
        """The one stored key; None if there is none; Ambiguous without ``kind``
        when several kinds have this namespace/name."""
        keys = self._keys(namespace, name, kind)
        if len(keys) > 1:
            raise Ambiguous(namespace, name, [k[0] for k in keys])
        return keys[0] if keys else None

    # --- persistence ------------------------------------------------------------------

    def load(self) -> PolicyStore:
        """Read ``policies.yaml`` (if any) and rewrite the published files from it.
        Raises SourceError if the stored file does not load (never drops it)."""
        with y.gc_paused():  # see _GC_NOTE
            return self._load()

    def _load(self) -> PolicyStore:
        path = self.store_path
        texts: dict[Key, str] = {}
        docs: dict[Key, dict] = {}
        objs: dict[Key, Any] = {}
        if path and os.path.exists(path):
            text = y.read_text(path)
            body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#")).strip()
            if body:
                plain: list[dict] = []
                got = self._collect([(path, text)], plain)
                objs = {(kind, o.namespace, o.name): o for kind, found in got.items() for o in found}
                for doc in plain:
                    meta = doc["metadata"]
                    key = (doc["kind"], meta["namespace"], meta["name"])
                    texts[key], docs[key] = _dump(doc), doc
        self._published.clear()
        self._commit(texts, docs, objs, write_store=False)
        return self

    def _publish(self, path: str, doc: dict) -> None:
        data = json.dumps(doc)
        if self._published.get(path) == data and os.path.exists(path):
            return
        write_atomic(path, data)
        self._published[path] = data

    def _commit(
        self, texts: dict[Key, str], docs: dict[Key, dict], objs: dict[Key, Any], write_store: bool = True
    ) -> None:
        with self._stage("compile"):
            ps, sets, version = self._build(texts, objs)
        with self._stage("write"):
            self._write(texts, ps, sets, version, write_store)
        self._texts, self._docs, self._objs = texts, docs, objs
        # Readers in other threads (the agent's tick) take these without the
        # store's lock: each is replaced whole, never changed in place.
        self.policyset, self.sets, self.version = ps, sets, version

    def _write(
        self, texts: dict[Key, str], ps: PolicySet, sets: dict[str, dict], version: str, write_store: bool
    ) -> None:
        if self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            if write_store:
                write_atomic(os.path.join(self.run_dir, STORE_FILE), _header(version) + self._text(texts))
            self._publish(os.path.join(self.run_dir, COMPILED_FILE), self.compiled(ps, texts))
            for kind, doc in sets.items():
                published = self.published_path(kind)
                assert published is not None  # run_dir is set
                self._publish(published, doc)

    def compiled(self, ps: PolicySet | None = None, texts: dict[Key, str] | None = None) -> dict:
        """The ``policies.json`` document (see the module docstring)."""
        ps = ps if ps is not None else self.policyset
        texts = texts if texts is not None else self._texts
        return {
            "format": COMPILED_FORMAT,
            "version": ps.version,
            "trustDomain": ps.trust_domain,
            "rootNamespace": ps.root_namespace,
            "count": len(ps) + len(ps.authentications),
            "yaml": self._text(texts, _SET_KINDS),
            "compiledFormat": compiled_format,
            "policies": policies_to_data(ps.policies, ps.authentications),
        }

    # --- operations -------------------------------------------------------------------

    def apply(self, sources: Sequence[tuple[str, str]]) -> list[Change]:
        """Create or replace the documents of ``sources`` ((filename, text) pairs),
        all or none.  Raises SourceError (nothing changed) on any bad document."""
        self.timings = {}
        with y.gc_paused():  # see _GC_NOTE
            (texts, docs, objs), changes = self._plan(sources)
            if any(c.result != UNCHANGED for c in changes):
                self._commit(texts, docs, objs)
        return changes

    def replace_all(
        self, sources: Sequence[tuple[str, str]], *, what: str = "the policy set"
    ) -> list[Change]:
        """Make the store hold exactly the documents of ``sources`` (none
        empties it): created, configured and deleted in one commit -- one
        new version, each file written once -- or nothing at all (a bad
        document raises SourceError, a set over ``max_bytes`` StoreFull,
        naming ``what``).  The changes: deletions last."""
        self.timings = {}
        with y.gc_paused():  # see _GC_NOTE
            with self._stage("parse"):
                new, objs = self._parse(sources, whole=what)
            with self._stage("plan"):
                (texts, docs, merged), changes = self._merge(new, objs)
                for key in sorted(self._texts, key=_order):
                    if key not in new:
                        for d in (texts, docs, merged):
                            del d[key]
                        changes.append(Change(key[1], key[2], DELETED, key[0]))
            if any(c.result != UNCHANGED for c in changes):
                self._commit(texts, docs, merged)
        return changes

    def diff(self, sources: Sequence[tuple[str, str]]) -> tuple[str, list[Change]]:
        """What :meth:`apply` would change: a unified diff per created or
        configured document (``a/<ns>/<name>`` vs ``b/<ns>/<name>``, with a
        ``<kind>/`` in front for kinds other than AuthorizationPolicy;
        ``/dev/null`` for a new one), and the changes.  Changes nothing."""
        self.timings = {}
        with y.gc_paused():  # see _GC_NOTE
            (texts, _, _), changes = self._plan(sources)
        import difflib  # here: only `policy diff` uses it; the agent and workers would hold it

        out: list[str] = []
        for c in changes:
            if c.result == UNCHANGED:
                continue
            key = (c.kind, c.namespace, c.name)
            old = self._texts.get(key, "")
            shown = ("" if c.kind == KIND else f"{c.kind.lower()}/") + f"{c.namespace}/{c.name}"
            out += difflib.unified_diff(
                old.splitlines(keepends=True),
                texts[key].splitlines(keepends=True),
                fromfile=f"a/{shown}" if old else "/dev/null",
                tofile=f"b/{shown}",
            )
        return "".join(out), changes

    def delete(self, namespace: str, name: str, kind: str | None = None) -> bool:
        """Remove one document; False if there was none.  Raises Ambiguous
        without ``kind`` if documents of several kinds have this name."""
        key = self._key(namespace, name, kind)
        if key is None:
            return False
        texts, docs, objs = dict(self._texts), dict(self._docs), dict(self._objs)
        for d in (texts, docs, objs):
            del d[key]
        with y.gc_paused():  # see _GC_NOTE
            self._commit(texts, docs, objs)
        return True

    def list(self) -> list[dict]:
        """One summary per document: AuthorizationPolicies first (namespace/name
        order), then each other kind.  Every row has ``kind``, ``namespace``, ``name``."""
        rows: list[dict[str, Any]] = [
            {
                "kind": KIND,
                "namespace": p.namespace,
                "name": p.name,
                "action": p.action.value,
                "selector": dict(p.selector),
                "rules": len(p.rules),
                "apiVersion": p.api_version,
            }
            for p in self.policyset.policies
        ]
        rows += [
            {
                "kind": AUTHN_KIND,
                "namespace": a.namespace,
                "name": a.name,
                "selector": dict(a.selector),
                "issuers": [r.issuer for r in a.jwt_rules],
                "apiVersion": a.api_version,
            }
            for a in self.policyset.authentications
        ]
        for doc in self.sets.values():
            rows += doc["policies"]
        return rows

    def get(self, namespace: str, name: str, kind: str | None = None) -> dict[str, Any] | None:
        """The stored document (plain data), or None.  Raises Ambiguous (see delete)."""
        key = self._key(namespace, name, kind)
        doc = self._docs.get(key) if key is not None else None
        return None if doc is None else copy.deepcopy(doc)

    def get_yaml(self, namespace: str, name: str, kind: str | None = None) -> str | None:
        key = self._key(namespace, name, kind)
        return self._texts.get(key) if key is not None else None

    def kind_of(self, namespace: str, name: str, kind: str | None = None) -> str | None:
        key = self._key(namespace, name, kind)
        return key[0] if key is not None else None

    def summary(self) -> dict:
        by_kind = {KIND: len(self.policyset), **{k: d["count"] for k, d in self.sets.items()}}
        if self.policyset.authentications:
            by_kind[AUTHN_KIND] = len(self.policyset.authentications)
        return {"version": self.version, "count": self.count, "byKind": by_kind}
