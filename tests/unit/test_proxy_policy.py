"""L4 authorization in the node proxy (issue #4), in-process on loopback with
the harness of tests/support/mesh.py: policies.json next to each node's state
file, written by the agent's own PolicyStore.  Also the shared FileWatcher
and the TrafficWatcher on traffic.json (agent/proxy/watch.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from agent.policy.store import PolicyStore
from agent.proxy.authz import PolicyWatcher, empty_set
from agent.proxy.watch import FileWatcher, TrafficWatcher, traffic_path
from agent.traffic.trafficpolicy import DEFAULTS, TRAFFIC_KIND
from tests.support.aio import run
from tests.support.mesh import CLIENT_ID, V4, Cluster, FlowOrigin, exchange, expect_reset
from tests.support.policy import LABELS, apply, doc


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


# --- the generic FileWatcher and the TrafficWatcher (agent/proxy/watch.py) ---------------

def _replace(path, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def test_file_watcher_keeps_last_good_and_counts(tmp_path, caplog):
    path = tmp_path / "n.txt"
    seen = []

    def load(p):
        with open(p) as f:
            return int(f.read())  # ValueError on garbage

    w = FileWatcher(str(path), load, 0, what="number", version=lambda n: n,
                    on_change=lambda old, new: seen.append((old, new)))
    assert w.check() is False and w.errors == 1 and "disappeared" in w.last_error  # no file, no `missing`
    _replace(path, "1")
    assert w.check() is True and w.current == 1 and w.reloads == 1 and w.last_error is None
    assert w.check() is False  # same signature: not even read
    _replace(path, "1")  # new file, same version: not a change
    assert w.check() is False and w.reloads == 1
    with caplog.at_level(logging.ERROR, logger="meshlet.proxy"):
        _replace(path, "one")
        assert w.check() is False
    assert w.current == 1 and w.errors == 2 and "cannot reload number" in w.last_error
    assert "keeping 1" in caplog.text
    w.on_change = lambda old, new: 1 / 0  # a failing callback does not undo a good reload
    _replace(path, "2")
    assert w.check() is True and w.current == 2 and seen == [(0, 1)]


def _traffic_doc(attempts: int) -> str:
    return ("apiVersion: meshlet.io/v1alpha1\nkind: TrafficPolicy\n"
            "metadata: {name: backend, namespace: shop}\n"
            f"spec:\n  service: backend\n  retries: {{attempts: {attempts}}}\n")


def test_traffic_watcher_follows_the_store(tmp_path):
    state = tmp_path / "proxy-state.json"
    w = TrafficWatcher.for_state(str(state))  # no traffic.json yet: the empty set
    assert w.path == str(tmp_path / "traffic.json") == traffic_path(str(state))
    assert len(w.current) == 0 and w.errors == 0
    assert w.current.settings_for("shop", "backend", 80) == DEFAULTS

    store = PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load()
    assert w.check() is False  # the store wrote an empty traffic.json: same (empty) version
    store.apply([("t.yaml", _traffic_doc(4))])
    assert w.check() is True and w.reloads == 1
    assert w.current.settings_for("shop", "backend", 80).retries.attempts == 4
    assert w.stats() == {"version": w.current.version, "count": 1, "reloads": 1, "errors": 0,
                         "last_error": None}
    good = w.current

    # a broken file: counted, the last good set stays
    doc = json.loads((tmp_path / "traffic.json").read_text())
    data = doc["data"]
    retries = data[0]["settings"]["retries"]
    assert retries["attempts"] == 4
    for broken, why in [
        ("{nope", "not valid JSON"),
        (json.dumps({**doc, "format": 9}), "expected an object with format 1"),
        (json.dumps({**doc, "version": "0000"}), "but the file says 0000"),
        (json.dumps({**doc, "dataFormat": 2}), "dataFormat 2 is not 1"),
        # data that says something else than the version: refused, whatever the YAML says
        (json.dumps({**doc, "data": [{**data[0], "settings": {"retries": {**retries, "attempts": 5}}}]}),
         "the policies have version"),
        (json.dumps({**doc, "data": [{**data[0], "settings": {"retries": {**retries, "attempts": "4"}}}]}),
         "data[0].settings.retries.attempts: expected int, got '4'"),
        (json.dumps({**doc, "data": [{**data[0], "settings": {"retries": {**retries, "attemps": 4}}}]}),
         "data[0].settings.retries: unknown field 'attemps'"),
        (json.dumps({**doc, "data": [{**data[0], "weight": 1}]}), "data[0]: unknown field 'weight'"),
        (json.dumps({**doc, "data": [{**data[0], "settings": {"retry": {}}}]}),
         "data[0].settings: unknown section 'retry'"),
        (json.dumps({**doc, "data": {"policies": data}}), "expected a list of traffic policies"),
    ]:
        _replace(tmp_path / "traffic.json", broken)
        assert w.check() is False
        assert w.current is good
        assert "traffic.json" in w.last_error and why in w.last_error, (why, w.last_error)
    assert w.errors == 10

    # a file from an agent without "data": its YAML is read (the YAML front end, loaded then)
    old_agent = {k: v for k, v in doc.items() if k not in ("data", "dataFormat")}
    _replace(tmp_path / "traffic.json", json.dumps({**old_agent, "yaml": doc["yaml"] + "\n"}))
    assert w.check() is False and w.current.version == good.version and w.last_error is None
    _replace(tmp_path / "traffic.json",
             json.dumps({**old_agent, "yaml": doc["yaml"].replace("attempts: 4", "attempts: 99")}))
    assert w.check() is False and w.current.version == good.version
    assert w.errors == 11 and "do not load" in w.last_error

    # the agent fixes it; then a delete empties it; then the file goes away
    store.load()
    assert w.check() is False and w.last_error is None and w.current.version == good.version
    store.delete("shop", "backend", "TrafficPolicy")
    assert w.check() is True and len(w.current) == 0
    store.apply([("t.yaml", _traffic_doc(1))])
    assert w.check() is True and len(w.current) == 1
    os.unlink(tmp_path / "traffic.json")
    assert w.check() is True and len(w.current) == 0


def test_policy_watcher_ignores_traffic_changes(tmp_path):
    """policies.json is authorization-only: applying a TrafficPolicy does not
    make the authorization watcher reload (nor re-check live connections)."""
    store = PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load()
    store.apply([("a.yaml", doc("shop", "deny", "web", "DENY", "[{}]"))])
    pw = PolicyWatcher(str(tmp_path / "policies.json"))
    assert len(pw.current) == 1 and pw.reloads == 1
    store.apply([("t.yaml", _traffic_doc(3))])
    assert pw.check() is False and pw.reloads == 1 and pw.errors == 0
