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
        except Exception:  # noqa: BLE001 - best effort; tests report real problems
            pass
