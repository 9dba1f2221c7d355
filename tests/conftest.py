"""Test tiers: unit (no root), privileged (root + real kernel; marked
``privileged``), slow (opt-in with ``-m slow``)."""

from __future__ import annotations

import os


def pytest_sessionstart(session):
    # Leftovers of a crashed earlier run (netns, cgroups) would break this one.
    if os.geteuid() == 0:
        try:
            from agent.sim import cleanup_stale
            cleanup_stale()
            _remove_stale_mesh_state()
        except Exception:  # noqa: BLE001 - best effort; tests report real problems
            pass


def _remove_stale_mesh_state() -> None:
    """Pins and run dirs of simulated meshes whose cluster is gone."""
    import glob
    import shutil

    from agent.datapath.loader import remove_pins

    for path in glob.glob("/sys/fs/bpf/meshlet/mls*-*") + glob.glob("/run/meshlet/mls*-*"):
        prefix = os.path.basename(path).split("-", 1)[0]
        if os.path.exists(f"/run/meshlet-sim/{prefix}.json"):
            continue  # its cluster is alive (or cleanup_stale decided to keep it)
        if path.startswith("/sys/fs/bpf/"):
            remove_pins(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
