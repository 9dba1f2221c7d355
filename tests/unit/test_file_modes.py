"""Files that tell an attacker on the node who talks to whom are private
from their first byte (issue #12 item 10): write_atomic files 0600, logs
0640, also over an older world-readable file, also after a rotation.

The process umask is set to 0 around each test, so a mode that is right
only thanks to a friendly umask fails here."""

from __future__ import annotations

import json
import os
import stat

import pytest

from agent.fsutil import LOG_MODE, PRIVATE, open_append, write_atomic
from agent.policy.store import COMPILED_FILE, STORE_FILE, PolicyStore
from agent.proxy.log import AccessLog


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_write_atomic_creates_the_file_private(tmp_path):
    path = tmp_path / "proxy-state.json"
    write_atomic(str(path), "{}")
    assert mode(path) == PRIVATE == 0o600


def test_write_atomic_replaces_a_world_readable_file_with_a_private_one(tmp_path):
    path = tmp_path / "policies.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_atomic(str(path), "new")
    assert mode(path) == 0o600 and path.read_text() == "new"


def test_write_atomic_ignores_a_leftover_temp_file_with_wide_permissions(tmp_path):
    path = tmp_path / "state.json"
    tmp = tmp_path / f"state.json.tmp.{os.getpid()}"
    tmp.write_text("stale")
    os.chmod(tmp, 0o666)
    write_atomic(str(path), "fresh")
    assert mode(path) == 0o600 and path.read_text() == "fresh"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_write_atomic_mode_can_be_chosen(tmp_path):
    path = tmp_path / "pub"
    write_atomic(str(path), "x", mode=0o640)
    assert mode(path) == 0o640


def test_open_append_creates_0640_and_narrows_an_existing_file(tmp_path):
    new = tmp_path / "proxy-0.log"
    with open_append(str(new), binary=True) as f:
        f.write(b"line\n")
    assert mode(new) == LOG_MODE == 0o640
    old = tmp_path / "old.log"
    old.write_text("before\n")
    os.chmod(old, 0o666)
    with open_append(str(old)) as f:
        f.write("after\n")
    assert mode(old) == 0o640
    assert old.read_text() == "before\nafter\n"  # appended, not truncated


def test_open_append_never_widens_a_stricter_file(tmp_path):
    path = tmp_path / "strict.log"
    path.write_text("")
    os.chmod(path, 0o600)
    with open_append(str(path)):
        pass
    assert mode(path) == 0o600


def record(i: int) -> dict:
    return {"direction": "outbound", "n": i}


def test_access_log_is_0640_and_follows_a_rotation_with_the_same_mode(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        log.write(record(1))
        assert mode(path) == 0o640
        os.rename(path, tmp_path / "access.log.1")  # logrotate without copytruncate
        log.write(record(2))  # still the old file until the periodic flush notices
        log.flush()
        log.write(record(3))
        assert mode(path) == 0o640
        assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == [3]
        rotated = (tmp_path / "access.log.1").read_text().splitlines()
        assert [json.loads(x)["n"] for x in rotated] == [1, 2]
        os.unlink(path)  # removed outright: recreated as well
        log.flush()
        log.write(record(4))
        assert mode(path) == 0o640
    finally:
        log.close()


def test_access_log_narrows_an_existing_world_readable_file(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("")
    os.chmod(path, 0o644)
    log = AccessLog(str(path))
    log.close()
    assert mode(path) == 0o640


def test_policy_store_files_are_private(tmp_path):
    s = PolicyStore(str(tmp_path))
    s.apply([("a.yaml", """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
""")])
    written = [p for p in os.listdir(tmp_path) if os.path.isfile(tmp_path / p)]
    assert STORE_FILE in written and COMPILED_FILE in written, written
    assert {p: mode(tmp_path / p) for p in written} == {p: 0o600 for p in written}
