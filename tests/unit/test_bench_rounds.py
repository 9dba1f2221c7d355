"""The benchmark's alternated rounds (scripts/bench.py): same-node mesh
against direct is judged on the median of each round's own ratio."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import bench  # scripts/ is not a package: on sys.path above


def test_paired_ratios_take_each_rounds_own_ratio_and_skip_failed_runs():
    rounds = [
        # the host slows down in round 2 for both sides alike: the ratio holds
        {"mesh": {"http": {"rps": 80.0}, "bulk": {"gbps": 20.0}},
         "direct": {"http": {"rps": 100.0}, "bulk": {"gbps": 10.0}}},
        {"mesh": {"http": {"rps": 40.0}, "bulk": {"gbps": None}},
         "direct": {"http": {"rps": 50.0}, "bulk": {"gbps": 9.0}}},
        {"mesh": {"http": {"rps": 95.0}, "bulk": {"gbps": 18.0}},
         "direct": {"http": {"rps": 100.0}, "bulk": {"gbps": 12.0}}},
    ]
    r = bench.paired_ratios(rounds, "mesh", "direct")
    assert r["rps_rounds"] == [0.8, 0.8, 0.95] and r["rps"] == 0.8
    assert r["bulk_rounds"] == [2.0, 1.5] and r["bulk"] == 1.75  # the failed iperf3 run is left out, not 0
    assert bench.paired_ratios([{"mesh": {}, "direct": {}}], "mesh", "direct")["rps"] is None
