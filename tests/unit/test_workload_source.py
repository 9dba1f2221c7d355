"""The workload source interface (agent/workloads/source.py) and the YAML
file source (agent/workloads/filesource.py), on real files changed on disk."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent.config import parse_config
from agent.fsutil import write_atomic
from agent.workloads.filesource import FileSource
from agent.workloads.source import WorkloadSource, changes, source_from_config
from agent.yamlsrc import SourceError

INV = """\
nodes:
  - name: node1
    address: 198.18.0.1
pods:
  - name: web
    node: node1
    ips: [10.244.1.10]
    cgroup: /x/web
"""

TWO_PODS = INV + """\
  - name: db
    node: node1
    ips: [10.244.1.11]
    cgroup: /x/db
"""

# line 11, column 11: the second pod's first IP
BAD = INV + """\
  - name: db
    node: node1
    ips: [10.244.1.999]
    cgroup: /x/db
"""


def test_file_source_follows_the_file_and_keeps_the_last_good(tmp_path):
    path = str(tmp_path / "inv.yaml")
    write_atomic(path, INV)
    src = FileSource(path)
    assert isinstance(src, WorkloadSource)
    assert src.describe().last_good is None
    first = src.start()
    assert [p.key for p in first.pods] == ["default/web"]
    status = src.describe()
    assert (status.kind, status.where, status.error) == ("file", path, None)
    assert status.last_good is not None
    assert src.poll() is None  # unchanged

    write_atomic(path, TWO_PODS)
    second = src.poll()
    assert second is not None and [p.key for p in second.pods] == ["default/web", "default/db"]
    assert src.poll() is None

    write_atomic(path, BAD)
    with pytest.raises(SourceError) as e:
        src.poll()
    assert f"{path}:11:11: pods[1].ips[0]" in str(e.value)
    assert src.describe().error == str(e.value)
    assert src.inventory is second          # the last good one stays
    assert src.poll() is None                # reported once, until the file changes again

    write_atomic(path, INV)
    third = src.poll()
    assert third is not None and [p.key for p in third.pods] == ["default/web"]
    assert src.describe().error is None and src.inventory is third


def test_file_source_unreadable(tmp_path):
    path = str(tmp_path / "inv.yaml")
    with pytest.raises(SourceError, match=f"{path}: cannot read file: No such file"):
        FileSource(path).start()
    write_atomic(path, INV)
    src = FileSource(path)
    good = src.start()
    os.unlink(path)
    with pytest.raises(SourceError, match="cannot read file"):
        src.poll()
    assert "No such file" in (src.describe().error or "")
    assert src.inventory is good
    assert src.poll() is None


def test_bad_file_at_start_names_file_and_line(tmp_path):
    path = str(tmp_path / "inv.yaml")
    write_atomic(path, BAD)
    with pytest.raises(SourceError) as e:
        FileSource(path).start()
    assert f"{path}:11:11" in str(e.value)


def test_source_from_config_is_the_configured_file(tmp_path):
    cfg = parse_config(f"node: node1\ninventory: {tmp_path}/inv.yaml\ncgroup: meshlet/node1\n"
                       "identity: {bundle: b.pem, caCert: c.pem, caKey: k.pem}\n"
                       "proxy: {redirectIPv4: 10.244.1.1}\n", str(tmp_path / "c.yaml"))
    src = source_from_config(cfg)
    assert isinstance(src, FileSource) and src.where == f"{tmp_path}/inv.yaml"


def test_changes_yields_new_snapshots(tmp_path):
    path = str(tmp_path / "inv.yaml")
    write_atomic(path, INV)
    src = FileSource(path)
    src.start()

    async def next_two() -> list[int]:
        it = changes(src, 0.01)
        write_atomic(path, BAD)      # skipped: bad
        await asyncio.sleep(0.05)
        write_atomic(path, TWO_PODS)
        got = [len((await asyncio.wait_for(it.__anext__(), 10)).pods)]
        write_atomic(path, INV)
        got.append(len((await asyncio.wait_for(it.__anext__(), 10)).pods))
        await it.aclose()
        return got

    assert asyncio.run(next_two()) == [2, 1]
