"""AuthorizationPolicy documents for tests, and applying them to the
in-process two-node harness (tests/support/mesh.py) through the agent's own
PolicyStore, as both agents would."""

from __future__ import annotations

import asyncio

from agent.policy.store import PolicyStore

# pod name -> labels, for Cluster(labels=...): the selectors of doc() match these
LABELS = {"web-1": {"app": "web"}, "db-1": {"app": "db", "tier": "data"}}

# a policy that fails to load (an unknown operation field), line 7
BAD = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {colour: [red]}}]
"""


def doc(ns, name, app, action, rules):
    """One AuthorizationPolicy selecting ``app=<app>`` in ``ns``; ``rules`` is flow YAML."""
    return (f"apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: {action}\n"
            f"  rules: {rules}\n")


async def apply(c, *docs: str, delete: tuple[tuple[str, str], ...] = ()) -> str:
    """Apply on both nodes of the Cluster ``c`` (as both agents would), wait
    until both workers run it; returns the store version."""
    version = ""
    for node in ("node1", "node2"):
        store = PolicyStore(str(c.tmp / node)).load()
        if docs:
            store.apply([("test.yaml", "---\n".join(docs))])
        for ns, name in delete:
            store.delete(ns, name)
        version = store.version
    async with asyncio.timeout(10):
        while not all(s.policies.current.version == version for s in c.servers):
            await asyncio.sleep(0.05)
    return version
