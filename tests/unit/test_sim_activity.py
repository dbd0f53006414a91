"""A tiny run of the activity simulation through the collector (bench/sim_activity.py, `--through collector`): the
fleet's real `Fleet.on_feed` / `on_heartbeat` / `tick` on an injected clock. Nine days of 150 terminals, so it
only shows the wiring holds end to end (the figures come from the full run in docs/activity.md): the busy shops
that stop are flagged within an hour, the acquirers whose recorded volume halves within 30 minutes, and nothing
else is flagged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sim_activity", ROOT / "bench" / "sim_activity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_activity"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_a_small_fleet_through_the_collector_flags_the_stops_and_the_halvings_and_nothing_else() -> None:
    # Day 8 is Tuesday 2026-03-17: one week learned, the busy shops stop and the acquirers halve at 10:00 local.
    f = sim().run_collector(150, 9, seed=1, stop_day=8, halve_day=8)
    detect = f["detect"]
    assert f["stopped"] >= 1 and f["missed"] == 0 and len(detect) == f["stopped"], f
    assert all(0 < m <= 60 for m in detect), detect
    found = f["volume_detect"]
    # The two biggest acquirers expect over 200 records in 30 minutes at 10:00; the small ones are not judged.
    biggest = sorted(f["acquirers"], key=lambda a: -f["acquirers"][a])[:2]
    assert set(biggest) <= set(found), (f["acquirers"], found)
    assert all(0 < m <= 30 for m in found.values()), found
    assert f["false_all"] == 0 and f["volume"]["false"] == 0, f
    assert not set(f["other"]) - {"upstream_missing"}, f["other"]  # halved feeds leave uploads unrecorded
