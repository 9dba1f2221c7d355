"""Per-connection book-keeping made cheaper: the access log's timestamp text,
response flags on close, and metric label sets made once per pair of ends."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from agent.proxy import telemetry as m
from agent.proxy.conn import utc_ms
from tests.support.aio import run, until
from tests.support.mesh import V4, Cluster, FlowOrigin, exchange

WEB = m.Peer(workload="web", namespace="default", principal="spiffe://td/ns/default/sa/web", app="web")


def test_utc_ms_is_the_isoformat_text_of_now():
    for _ in range(200):
        before = datetime.now(UTC).replace(microsecond=0)
        text = utc_ms()
        after = datetime.now(UTC)
        got = datetime.fromisoformat(text)
        assert before <= got <= after, (before, text, after)
        assert text == got.isoformat(timespec="milliseconds")  # same shape: ms, +00:00
        time.sleep(0.0005)


def test_with_result_keeps_the_labels_of_a_clean_close():
    lb = m.labels_for("source", WEB, WEB, "10.0.0.1", m.UNKNOWN, True)
    assert m.with_result(lb, "ok") is lb
    reset = m.with_result(lb, "reset")
    assert reset is not lb and dict(zip(m.LABELS, reset))["response_flags"] == "UC"
    assert [a for a, b in zip(reset, lb, strict=True) if a != b] == ["UC"]
    assert m.with_result(reset, "ok") == lb


def test_label_sets_are_made_once_per_pair_of_ends(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            for _ in range(3):
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
                assert await exchange(r, w, b"x") == b"x|bye from 127.0.0.5"
            await until(lambda: c.servers[0].accounting.finished == 3)
            acc = c.servers[0].accounting
            cached = [labels for _, _, labels in acc._labels.values()]
            rows = c.servers[0].inputs.metrics.snapshot()["tcp"]
            await asyncio.sleep(0)
            return cached, rows

    cached, rows = run(main())
    assert len(cached) == 1 and len(cached[0]) == 2  # one pair of ends; source and destination reporters
    by_labels = {tuple(lb): (opened, closed) for lb, opened, closed, _, _ in rows}
    for lb in cached[0]:
        assert by_labels[lb] == (3, 3)


def test_label_sets_follow_a_new_state_snapshot(tmp_path):
    """A reload that relabels a pod (its ``app``) must show in the metrics of
    the next connection: the cache may not keep the old snapshot's labels."""
    import json
    import os

    def relabel(c, app: str) -> None:
        p = tmp_path / "node1" / "state.json"
        doc = json.loads(p.read_text())
        doc["generation"] += 1
        for pod in doc["pods"]:
            if pod["name"] == "web-1":
                pod["labels"] = {"app": app}
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, p)
        assert c.servers[0].watcher.check()

    async def one(c):
        r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
        assert await exchange(r, w, b"x") == b"x|bye from 127.0.0.5"

    async def main():
        async with Cluster(tmp_path, labels={"web-1": {"app": "before"}}) as c:
            await one(c)
            await until(lambda: c.servers[0].accounting.finished == 1)
            relabel(c, "after")
            await one(c)
            await until(lambda: c.servers[0].accounting.finished == 2)
            return c.servers[0].inputs.metrics.snapshot()["tcp"]

    rows = run(main())
    apps = {}
    for lb, opened, _closed, _, _ in rows:
        d = dict(zip(m.LABELS, lb))
        if d["destination_workload"] == "web-1" or d.get("destination_app") in ("before", "after"):
            apps[d["destination_app"]] = apps.get(d["destination_app"], 0) + opened
    assert apps == {"before": 2, "after": 2}, rows  # one connection each, two reporters
