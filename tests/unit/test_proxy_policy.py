"""L4 authorization in the node proxy (issue #4), in-process on loopback with
the harness of test_proxy_server: policies.json next to each node's state
file, written by the agent's own PolicyStore."""

from __future__ import annotations

import asyncio
import logging

from agent.policy.store import PolicyStore
from agent.proxy.authz import empty_set
from tests.unit.test_proxy_server import (
    CLIENT_ID, V4, Cluster, FlowOrigin, exchange, expect_reset, run,
)

LABELS = {"web-1": {"app": "web"}, "db-1": {"app": "db", "tier": "data"}}


def doc(ns, name, app, action, rules):
    return (f"apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: {action}\n"
            f"  rules: {rules}\n")


async def apply(c: Cluster, *docs: str, delete: tuple[tuple[str, str], ...] = ()) -> str:
    """Apply on both nodes (as both agents would), wait until both workers run it."""
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


async def talk(c: Cluster, ip: str, port: int | None = None) -> bytes | None:
    """One exchange from the client pod; None if the client was reset."""
    r, w = await c.connect(FlowOrigin(V4, ip, port or c.port(ip), 1001))
    try:
        return await exchange(r, w, b"hi")
    except ConnectionResetError:
        return None


def test_allowed_and_denied_by_principal_namespace_and_port(tmp_path):
    async def main():
        async with Cluster(tmp_path, labels=LABELS) as c:
            assert await talk(c, "127.0.0.5") is not None  # no policies: allowed
            web, db = c.port("127.0.0.5"), c.port("127.0.0.7")
            await apply(
                c,
                doc("default", "web-allow", "web", "ALLOW",
                    f"[{{from: [{{source: {{principals: [ns/default/sa/client]}}}}], "
                    f"to: [{{operation: {{ports: ['{web}']}}}}]}}]"),
                doc("data", "db-allow", "db", "ALLOW", "[{from: [{source: {namespaces: [default]}}]}]"),
            )
            got = [await talk(c, "127.0.0.5"), await talk(c, "127.0.0.7")]
            # another port of web: no ALLOW rule matches (Local route)
            got.append(await talk(c, "127.0.0.5", c.closed_web))
            # only another principal may reach web now (Local)
            await apply(c, doc("default", "web-allow", "web", "ALLOW",
                               "[{from: [{source: {principals: [ns/default/sa/other]}}]}]"))
            got.append(await talk(c, "127.0.0.5"))
            # DENY by source namespace and port (Tunnel)
            await apply(c, doc("data", "db-deny", "db", "DENY",
                               f"[{{from: [{{source: {{namespaces: [default]}}}}], "
                               f"to: [{{operation: {{ports: ['{db}']}}}}]}}]"))
            got.append(await talk(c, "127.0.0.7"))
            await asyncio.sleep(0.1)
            return got, c.access("node1"), c.access("node2"), c.servers[1].stats(), c.servers[0].stats()

    got, log1, log2, stats2, stats1 = run(main())
    assert got[0] == b"hi|bye from 127.0.0.5" and got[1] == b"hi|bye from 127.0.0.7"
    assert all(g in (None, b"") for g in got[2:])  # reset (or at least closed)
    # node1 (Local): allowed (no policies), allowed, denied (port), denied (principal)
    local = [e for e in log1 if e["route"] == "local"]
    assert [e["verdict"] for e in local] == ["allowed", "allowed", "denied", "denied"]
    assert local[0]["policy"] is None
    assert local[1]["policy"] == "default/web-allow" and local[1]["rule"] == 0
    assert local[2]["result"] == "rejected" and local[2]["deny_reason"] == "policy"
    assert local[2]["policy"] is None and "none of their rules match" in local[2]["reason"]
    assert local[3]["src_identity"] == CLIENT_ID and local[3]["verdict"] == "denied"
    # node2 (destination of the tunnel): allowed by db-allow, then denied by db-deny
    assert [(e["verdict"], e["policy"], e["rule"]) for e in log2] == [
        ("allowed", "data/db-allow", 0), ("denied", "data/db-deny", 0)]
    assert log2[1]["result"] == "rejected" and log2[1]["src_identity"] == CLIENT_ID
    # the source proxy reset its client after the FORBIDDEN answer
    tunnel = [e for e in log1 if e["route"] == "tunnel"]
    assert tunnel[-1]["result"] == "rejected" and "forbidden" in tunnel[-1]["reason"]
    assert stats2["metrics"]["denied"]["policy"] == 1
    assert stats2["policy"]["count"] == 3 and stats2["policy"]["errors"] == 0
    assert stats2["metrics"]["denied_policies"] == {"data/db-deny": 1}
    assert stats1["metrics"]["denied_policies"] == {"": 2}  # no ALLOW rule matched: no one policy


def test_audit_is_logged_without_blocking(tmp_path):
    async def main():
        async with Cluster(tmp_path, labels=LABELS) as c:
            await apply(c, doc("data", "db-audit", "db", "AUDIT", "[{}]"),
                        doc("default", "web-audit", "web", "AUDIT", "[{}]"))
            got = [await talk(c, "127.0.0.7"), await talk(c, "127.0.0.5")]
            await asyncio.sleep(0.1)
            return got, c.access("node1"), c.access("node2")

    got, log1, log2 = run(main())
    assert got == [b"hi|bye from 127.0.0.7", b"hi|bye from 127.0.0.5"]
    (inb,) = log2
    assert inb["verdict"] == "allowed" and inb["audit"] == [{"policy": "data/db-audit", "rule": 0}]
    (local,) = [e for e in log1 if e["route"] == "local"]
    assert local["audit"] == [{"policy": "default/web-audit", "rule": 0}] and local["result"] == "ok"


def test_reload_closes_live_connections_no_longer_allowed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="meshlet.proxy")

    async def main():
        async with Cluster(tmp_path, labels=LABELS) as c:
            opened = []
            for ip in ("127.0.0.7", "127.0.0.5"):  # tunnel, then local
                r, w = await c.connect(FlowOrigin(V4, ip, c.port(ip), 1001))
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
                opened.append((r, w))
            await apply(c, doc("data", "db-deny", "db", "DENY", "[{from: [{source: {namespaces: [default]}}]}]"),
                        doc("default", "web-deny", "web", "DENY", "[{}]"))
            for r, w in opened:
                await expect_reset(r, w)
            await asyncio.sleep(0.1)
            return c.access("node1"), c.access("node2")

    log1, log2 = run(main())
    (inb,) = log2
    assert inb["verdict"] == "denied" and inb["policy"] == "data/db-deny"
    assert inb["deny_reason"] == "policy" and "closed" in inb["reason"]
    (local,) = [e for e in log1 if e["route"] == "local"]
    assert local["policy"] == "default/web-deny" and local["result"] == "rejected"
    closed = [r.getMessage() for r in caplog.records if "no longer allowed" in r.getMessage()]
    assert len(closed) == 2
    assert any("data/db-deny" in m for m in closed) and any("default/web-deny" in m for m in closed)


def test_broken_policy_file_keeps_the_previous_set(tmp_path):
    async def main():
        async with Cluster(tmp_path, labels=LABELS) as c:
            srv = c.servers[0]
            await apply(c, doc("default", "web-deny", "web", "DENY", "[{}]"))
            version = srv.policies.current.version
            path = c.tmp / "node1" / "policies.json"
            path.write_text('{"format": 1, "version": "x", "trustDomain": "cluster.local", '
                            '"rootNamespace": "istio-system", "yaml": "kind: [oops"}')
            async with asyncio.timeout(10):
                while srv.policies.errors == 0:
                    await asyncio.sleep(0.05)
            denied = await talk(c, "127.0.0.5")
            still = srv.policies.current.version
            path.unlink()  # no file: no policies
            async with asyncio.timeout(10):
                while srv.policies.current.version != empty_set().version:
                    await asyncio.sleep(0.05)
            allowed = await talk(c, "127.0.0.5")
            return version, still, denied, allowed, srv.policies.last_error

    version, still, denied, allowed, err = run(main())
    assert still == version
    assert denied in (None, b"")
    assert allowed == b"hi|bye from 127.0.0.5"
    assert err and "policies.json" in err
