"""The agent's policy store: the applied policies, persisted under runDir.

The store holds the current :class:`~.model.PolicySet` and, for every policy,
its source document (normalized: re-dumped YAML, so comments and formatting
are not kept, as with ``kubectl get -o yaml``).

Files in ``run_dir`` (each written atomically: temp file, fsync, rename):

``policies.yaml``
    The source of truth: every stored document, sorted by namespace/name,
    separated by ``---``, after a ``# meshlet policy store: version V`` comment.
    A restarted agent reloads it (and refuses to start if it does not load).

``policies.json``
    The compiled set, for the proxy workers (they will poll it like
    ``proxy-state.json``).  Written after ``policies.yaml``, and rewritten
    from it at load, so it never lags behind for long::

        {
          "format": 1,
          "version": "<PolicySet.version>",    # hash of the meaning
          "trustDomain": "cluster.local",
          "rootNamespace": "istio-system",
          "count": 6,
          "yaml": "<the text of policies.yaml>",  # parse_policies(yaml) gives the set back;
                                                 # a reader checks the version it gets
          "policies": [                          # the same set in plain JSON, for tools
            {"namespace": "shop", "name": "deny-admin", "action": "DENY",
             "selector": {"app": "backend"}, "rules": [...]}]   # rules: load._canon form
        }

Operations are atomic: :meth:`PolicyStore.apply` parses every document of
every source first; one bad document raises :class:`~agent.yamlsrc.SourceError`
(``file:line:column: field: what``) and changes nothing.  It creates or
replaces policies by ``namespace/name``; it never deletes (that is
:meth:`PolicyStore.delete`).  The store is not thread-safe: the caller runs
one operation at a time (the agent holds a lock around it).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from .. import yamlsrc as y
from .load import _canon, fingerprint, parse_sources
from .model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, PolicySet

__all__ = ["PolicyStore", "Change", "STORE_FILE", "COMPILED_FILE", "MAX_DOCUMENT_BYTES"]

STORE_FILE = "policies.yaml"
COMPILED_FILE = "policies.json"
COMPILED_FORMAT = 1
#: Upper bound on the source text of one apply/diff (the admin API enforces it too).
MAX_DOCUMENT_BYTES = 4 << 20

CREATED, CONFIGURED, UNCHANGED, DELETED = "created", "configured", "unchanged", "deleted"

Key = tuple[str, str]


@dataclass(frozen=True)
class Change:
    namespace: str
    name: str
    result: str
    """created | configured | unchanged | deleted"""

    def to_dict(self) -> dict:
        return {"namespace": self.namespace, "name": self.name, "result": self.result}


def _dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _header(version: str) -> str:
    return f"# meshlet policy store: version {version}\n"


def _write_atomic(path: str, data: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class PolicyStore:
    """See the module docstring.  ``run_dir=None`` keeps everything in memory."""

    def __init__(self, run_dir: str | None, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE):
        self.run_dir = run_dir
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self._docs: dict[Key, dict] = {}
        self._texts: dict[Key, str] = {}
        self.policyset = self._build({})

    # --- paths ------------------------------------------------------------------------

    @property
    def store_path(self) -> str | None:
        return os.path.join(self.run_dir, STORE_FILE) if self.run_dir else None

    @property
    def compiled_path(self) -> str | None:
        return os.path.join(self.run_dir, COMPILED_FILE) if self.run_dir else None

    @property
    def version(self) -> str:
        return self.policyset.version

    # --- pure helpers -----------------------------------------------------------------

    def _empty(self) -> PolicySet:
        return PolicySet((), self.trust_domain, self.root_namespace,
                         fingerprint((), self.trust_domain, self.root_namespace))

    def _text(self, texts: dict[Key, str]) -> str:
        return "---\n".join(texts[k] for k in sorted(texts))

    def _build(self, texts: dict[Key, str]) -> PolicySet:
        if not texts:
            return self._empty()
        return parse_sources([(STORE_FILE, self._text(texts))], trust_domain=self.trust_domain,
                             root_namespace=self.root_namespace)

    def _parse(self, sources: Sequence[tuple[str, str]]) -> dict[Key, dict]:
        """Validate every source (raises SourceError naming file:line:column),
        then read each document as plain data, keyed by namespace/name."""
        sources = list(sources)
        if not sources:
            raise y.SourceError([y.Problem("<input>", 0, 0, "", "no policy documents given")])
        total = sum(len(t.encode()) for _, t in sources)
        if total > MAX_DOCUMENT_BYTES:
            raise y.SourceError([y.Problem(sources[0][0], 0, 0, "",
                                           f"{total} bytes of policy text; the limit is "
                                           f"{MAX_DOCUMENT_BYTES}")])
        parse_sources(sources, trust_domain=self.trust_domain, root_namespace=self.root_namespace)
        out: dict[Key, dict] = {}
        for _, text in sources:
            for doc in yaml.safe_load_all(text):
                if doc is None:
                    continue
                meta = doc["metadata"]
                out[(meta["namespace"], meta["name"])] = doc
        return out

    def _plan(self, sources: Sequence[tuple[str, str]]) -> tuple[dict[Key, str], list[Change]]:
        new = self._parse(sources)
        texts = dict(self._texts)
        changes = []
        for key in sorted(new):
            old = self._docs.get(key)
            # same data (key order, quoting, comments aside): unchanged, stored text kept
            result = CREATED if old is None else UNCHANGED if old == new[key] else CONFIGURED
            changes.append(Change(key[0], key[1], result))
            if result != UNCHANGED:
                texts[key] = _dump(new[key])
        return texts, changes

    # --- persistence ------------------------------------------------------------------

    def load(self) -> "PolicyStore":
        """Read ``policies.yaml`` (if any) and rewrite ``policies.json`` from it.
        Raises SourceError if the stored file does not load (never drops it)."""
        path = self.store_path
        texts: dict[Key, str] = {}
        if path and os.path.exists(path):
            text = y.read_text(path)
            body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#")).strip()
            if body:
                parse_sources([(path, text)], trust_domain=self.trust_domain,
                              root_namespace=self.root_namespace)
                for doc in yaml.safe_load_all(text):
                    if doc is not None:
                        meta = doc["metadata"]
                        texts[(meta["namespace"], meta["name"])] = _dump(doc)
        self._commit(texts, write_store=False)
        return self

    def _commit(self, texts: dict[Key, str], write_store: bool = True) -> None:
        ps = self._build(texts)
        docs = {k: yaml.safe_load(t) for k, t in texts.items()}
        if self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            if write_store:
                _write_atomic(self.store_path, _header(ps.version) + self._text(texts))
            _write_atomic(self.compiled_path, json.dumps(self.compiled(ps, texts)))
        self._texts, self._docs, self.policyset = texts, docs, ps

    def compiled(self, ps: PolicySet | None = None, texts: dict[Key, str] | None = None) -> dict:
        """The ``policies.json`` document (see the module docstring)."""
        ps = ps if ps is not None else self.policyset
        texts = texts if texts is not None else self._texts
        return {
            "format": COMPILED_FORMAT, "version": ps.version, "trustDomain": ps.trust_domain,
            "rootNamespace": ps.root_namespace, "count": len(ps),
            "yaml": self._text(texts),
            "policies": [{"namespace": p.namespace, "name": p.name, "action": p.action.value,
                          "selector": dict(p.selector), "rules": _canon(p.rules)}
                         for p in ps.policies],
        }

    # --- operations -------------------------------------------------------------------

    def apply(self, sources: Sequence[tuple[str, str]]) -> list[Change]:
        """Create or replace the policies of ``sources`` ((filename, text) pairs),
        all or none.  Raises SourceError (nothing changed) on any bad document."""
        texts, changes = self._plan(sources)
        if any(c.result != UNCHANGED for c in changes):
            self._commit(texts)
        return changes

    def diff(self, sources: Sequence[tuple[str, str]]) -> tuple[str, list[Change]]:
        """What :meth:`apply` would change: a unified diff per created or
        configured policy (``a/<ns>/<name>`` vs ``b/<ns>/<name>``; ``/dev/null``
        for a new one), and the changes.  Changes nothing."""
        texts, changes = self._plan(sources)
        out: list[str] = []
        for c in changes:
            if c.result == UNCHANGED:
                continue
            key = (c.namespace, c.name)
            old = self._texts.get(key, "")
            out += difflib.unified_diff(
                old.splitlines(keepends=True), texts[key].splitlines(keepends=True),
                fromfile=f"a/{c.namespace}/{c.name}" if old else "/dev/null",
                tofile=f"b/{c.namespace}/{c.name}")
        return "".join(out), changes

    def delete(self, namespace: str, name: str) -> bool:
        """Remove one policy; False if there was none."""
        if (namespace, name) not in self._texts:
            return False
        texts = dict(self._texts)
        del texts[(namespace, name)]
        self._commit(texts)
        return True

    def list(self) -> list[dict]:
        """One summary per policy, ordered by namespace/name."""
        return [{"namespace": p.namespace, "name": p.name, "action": p.action.value,
                 "selector": dict(p.selector), "rules": len(p.rules),
                 "apiVersion": p.api_version}
                for p in self.policyset.policies]

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored document (plain data), or None."""
        doc = self._docs.get((namespace, name))
        return None if doc is None else yaml.safe_load(_dump(doc))

    def get_yaml(self, namespace: str, name: str) -> str | None:
        return self._texts.get((namespace, name))

    def summary(self) -> dict:
        return {"version": self.version, "count": len(self.policyset)}
