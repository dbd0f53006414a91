"""Per-terminal memory after a restart from the snapshot: RSS per registered terminal, and where the bytes go.

Method: a registry of N terminals (50 per site, 4 acquirers) and one realistic heartbeat applied to each
(13-19 digit counters and uptimes, terminal clocks, signal and battery values from a small set, every 25th
terminal in a condition), in a first process that writes the snapshot. A second, fresh process imports the
collector, reads its RSS, builds the `Collector` exactly as `posfleet run` does (registry, snapshot, Fleet,
gc.freeze) and reads RSS again: the difference over N is the figure. The object walk then splits one terminal's
bytes by kind (deduplicated by identity, so shared objects count once over the fleet).

    .venv/bin/python bench/bench_memory.py --terminals 1000000
    .venv/bin/python bench/bench_memory.py --terminals 100000 --baselines learned   # or: off (activity disabled)

With `--baselines learned` every terminal's activity baseline holds a real two-week record (so every one is
evaluated and in the check wheel after the restart); `off` switches activity baselines off for the comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    """This process's resident set size."""
    m = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def write_inputs(workdir: Path, n: int, per_site: int, baselines: str = "learned") -> Path:
    """Registry CSV and collector config; returns the config path."""
    with open(workdir / "terminals.csv", "w") as fh:
        fh.write("terminal_id,merchant_id,acquirer,model,site,region\n")
        for i in range(n):
            site = i // per_site
            fh.write(f"T{i:07d},M{i // 20:06d},acq-{'abcd'[site % 4]},{('A920', 'P400')[i % 2]},S{site:06d},"
                     f"r{site % 10}\n")
    config = workdir / "collector.yaml"
    config.write_text(
        "mqtt: {url: 'mqtt://127.0.0.1:1', client_id: bench-memory}\n"
        "http: {host: 127.0.0.1, port: 0}\n"
        f"registry: {{path: '{workdir / 'terminals.csv'}'}}\n"
        f"state: {{snapshot_path: '{workdir / 'state.snapshot'}', snapshot_interval_s: 3600}}\n"
        + ("activity: {enabled: false}\n" if baselines == "off" else "")
    )
    return config


def heartbeat(i: int, now: float, shape: str = "field") -> bytes:
    """One heartbeat shaped like a real terminal's (large counters, own clock, varying signal), or like
    bench/bench_ingest.py's (`shape="ingest"`: small counters, no uptime or power: the issue's 950 B baseline)."""
    if shape == "ingest":
        return json.dumps({
            "tid": f"T{i:07d}", "ts": round(now, 3), "seq": 2, "interval_s": 30, "txn_count": 2,
            "uploaded_count": 2, "queue_depth": 0, "oldest_queued_ts": None, "mid": f"M{i // 20:06d}",
            "model": ("A920", "P400")[i % 2], "app_version": "3.4.1", "net": {"type": "wifi", "rssi_dbm": -60},
            "hw": {"printer": "paper_out" if i % 25 == 0 else "ok", "display": "ok", "card_reader": "ok"},
        }).encode()
    return json.dumps({
        "tid": f"T{i:07d}", "mid": f"M{i // 20:06d}", "seq": 1_000_000 + i * 7, "ts": round(now - i % 100 * 0.01, 3),
        # Most terminals have uploaded everything (the counters are equal); every 10th has one queued.
        "interval_s": 30, "txn_count": 40_000 + i % 5000, "uploaded_count": 40_000 + i % 5000 - (i % 10 == 0),
        "queue_depth": int(i % 10 == 0), "oldest_queued_ts": now - 60 if i % 10 == 0 else None,
        "uptime_s": 86_400.5 + i,
        "model": ("A920", "P400")[i % 2], "app_version": "4.2.1", "os_version": "11",
        "net": {"type": "cellular", "rssi_dbm": -60 - i % 40},
        "power": {"source": "battery", "battery_pct": (i % 1000) / 10},
        "hw": {"printer": "paper_out" if i % 25 == 0 else "ok", "display": "ok", "card_reader": "ok"},
    }).encode()


def build_snapshot(config: Path, n: int, shape: str) -> None:
    """First process: the fleet after one heartbeat per terminal, written as the snapshot."""
    from collector.app import Collector
    from collector.config import load_config
    from collector.fleet.protocol import Heartbeat, decode

    c = Collector.load(load_config(config))
    now = time.time()
    out: list[Any] = []
    for i in range(n):
        msg = decode(f"pos/v1/T{i:07d}/heartbeat", heartbeat(i, now, shape), "pos/v1", "acquirer/v1")
        assert isinstance(msg, Heartbeat)
        for _ in range(3):  # paper_out needs a few heartbeats (hysteresis); the rest is the same each time
            c.fleet.on_heartbeat(msg, now, out)
    if c.fleet.activity.enabled:
        record = learned_record(now)
        activity = c.fleet.activity
        for tid in c.fleet.terminals:
            activity.store.load(activity.slot_of(tid), record)
    assert c.snapshot_now()


def learned_record(now: float) -> bytes:
    """A real baseline record: two weeks of a shop selling 0-2 a minute, 7:00 to 19:00 UTC, heartbeats every 60 s."""
    from zoneinfo import ZoneInfo

    from collector.fleet.baseline import BaselineStore

    store, tz = BaselineStore(1), ZoneInfo("Europe/Berlin")
    t, count = now - 14 * 86_400.0, 0
    prev: float | None = None
    while t < now:
        hour = time.gmtime(t).tm_hour
        sold = (hour + int(t // 60)) % 3 if 7 <= hour < 19 else 0
        store.observe(0, tz, prev, count, t, count + sold)
        prev, count, t = t, count + sold, t + 60
    assert store.evaluated(0)
    return store.record(0)


def breakdown(collector: Any, n: int) -> dict[str, float]:
    """Bytes per terminal by kind of object, each object counted once however many terminals share it."""
    seen: set[int] = set()
    kinds: dict[str, int] = {}

    def add(kind: str, obj: object) -> None:
        if obj is None or isinstance(obj, bool) or id(obj) in seen:
            return
        if isinstance(obj, int) and -5 <= obj <= 256:
            return  # cached small ints
        seen.add(id(obj))
        kinds[kind] = kinds.get(kind, 0) + sys.getsizeof(obj)

    fleet = collector.fleet
    add("fleet.terminals dict", fleet.terminals)
    activity = fleet.activity
    for kind, obj in (("activity store (64 B records)", activity.store.buf), ("activity slot->terminal list",
                      activity.tids), ("activity slot index", activity._index),
                      ("activity schedule (due + wheel)", activity.due)):
        add(kind, obj)
    for entries in activity.wheel.values():
        add("activity schedule (due + wheel)", entries)
    add("registry dict", collector.registry_file.entries)
    for tid, entry in collector.registry_file.entries.items():
        add("registry entries", entry)
        for f in entry.__struct_fields__:
            add("strings", getattr(entry, f))
        add("strings", tid)
    for t in fleet.terminals.values():
        add("Terminal structs", t)
        for f in t.__struct_fields__:
            v = getattr(t, f)
            if isinstance(v, str):
                add("strings", v)
            elif isinstance(v, float):
                add("floats", v)
            elif isinstance(v, int):
                add("ints", v)
            elif isinstance(v, dict):
                add(f"{f} dicts", v)
                for k, x in v.items():
                    add("strings", k)
                    add(f"{f} dicts", x)
            elif isinstance(v, tuple):
                add(f"{f} tuples", v)
            elif isinstance(v, list):
                add(f"{f} lists", v)
                for x in v:
                    add("floats", x)
    return {k: v / n for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def measure(config: Path, n: int) -> dict[str, Any]:
    """Second, fresh process: RSS before and after building the collector from registry and snapshot."""
    import collector.app  # noqa: F401  (everything imported before the first reading)
    from collector.app import Collector
    from collector.config import load_config
    from collector.fleet.registry import load_registry

    cfg = load_config(config)
    gc.collect()
    before = rss_bytes()
    started = time.monotonic()
    c = Collector.load(cfg)
    restore_s = time.monotonic() - started
    gc.collect()
    gc.freeze()  # as Collector.__aenter__ does
    after = rss_bytes()
    assert len(c.fleet.terminals) == n, len(c.fleet.terminals)
    assert c.restored.source.value == "current", c.restored
    registry_alone = load_registry(cfg.registry.path)  # a second copy, to see what the registry costs alone
    gc.collect()
    with_second_registry = rss_bytes()
    del registry_alone
    return {
        "terminals": n,
        "rss_per_terminal": (after - before) / n,
        "registry_per_terminal": (with_second_registry - after) / n,
        "restore_s": restore_s,
        "snapshot_bytes": os.path.getsize(cfg.state.snapshot_path or ""),
        "breakdown": breakdown(c, n),
    }


def measure_live(config: Path, n: int, shape: str) -> dict[str, Any]:
    """Fresh process, no snapshot: RSS per terminal after three heartbeats each through `Collector.process` (the
    live path: decode, state, detection), all messages of a round sharing one receive time as a socket read does."""
    from collector.app import Collector
    from collector.config import load_config
    from collector.ingest.mqtt import Inbound

    cfg = load_config(config)
    gc.collect()
    before = rss_bytes()
    c = Collector.load(cfg)
    gc.collect()
    gc.freeze()
    loaded = rss_bytes()
    now = time.time()
    for rnd in range(3):
        rx = now + 30 * rnd
        for i in range(n):
            body = json.loads(heartbeat(i, rx, shape))
            body["seq"] += rnd
            c.process(Inbound(f"pos/v1/T{i:07d}/heartbeat", json.dumps(body).encode(), False, 0, 1, rx))
    gc.collect()
    after = rss_bytes()
    return {"terminals": n, "registry_loaded_per_terminal": (loaded - before) / n,
            "rss_per_terminal": (after - before) / n, "breakdown": breakdown(c, n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terminals", type=int, default=1_000_000)
    ap.add_argument("--per-site", type=int, default=50)
    ap.add_argument("--shape", choices=("field", "ingest"), default="field",
                    help="heartbeats like a real fleet's, or like bench_ingest.py's (small counters, fewer fields)")
    ap.add_argument("--baselines", choices=("learned", "off"), default="learned",
                    help="activity baselines: a learned record per terminal (default), or switched off")
    ap.add_argument("--live", action="store_true",
                    help="no restart: three heartbeats per terminal through the live path, RSS per terminal after")
    ap.add_argument("--phase", choices=("all", "build", "measure"), default="all", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "build":
        build_snapshot(args.workdir / "collector.yaml", args.terminals, args.shape)
        return
    if args.phase == "measure":
        print(json.dumps(measure(args.workdir / "collector.yaml", args.terminals)))
        return
    if args.live:
        with tempfile.TemporaryDirectory(prefix="posfleet-bench-memory-") as tmp:
            live = measure_live(write_inputs(Path(tmp), args.terminals, args.per_site, args.baselines),
                                args.terminals, args.shape)
        print(f"terminals (registered, three live heartbeats each) {live['terminals']:,} ({args.shape} shape, "
              f"activity baselines {args.baselines})")
        print(f"RSS per terminal, registry loaded               {live['registry_loaded_per_terminal']:,.0f} B")
        print(f"RSS per terminal after the heartbeats            {live['rss_per_terminal']:,.0f} B")
        for kind, size in live["breakdown"].items():
            print(f"  {kind:<40} {size:7.1f} B")
        return
    with tempfile.TemporaryDirectory(prefix="posfleet-bench-memory-") as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, args.terminals, args.per_site, args.baselines)
        me = [sys.executable, __file__, "--terminals", str(args.terminals), "--workdir", str(workdir)]
        subprocess.run([*me, "--phase", "build", "--shape", args.shape], check=True)
        res = json.loads(subprocess.run([*me, "--phase", "measure"], check=True, capture_output=True).stdout)
    print(f"terminals (registered, one heartbeat each)   {res['terminals']:,} ({args.shape}-shaped heartbeats, "
          f"activity baselines {args.baselines})")
    print(f"load average (1/5/15 min)                   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"snapshot                                    {res['snapshot_bytes'] / 2**20:.1f} MiB, "
          f"restored in {res['restore_s']:.1f} s")
    print(f"RSS per terminal after restart              {res['rss_per_terminal']:,.0f} B")
    print(f"  of which the registry (a second copy)     {res['registry_per_terminal']:,.0f} B")
    print("object sizes per terminal (sys.getsizeof, shared objects once; allocator overhead not included):")
    for kind, size in res["breakdown"].items():
        print(f"  {kind:<40} {size:7.1f} B")
    print(f"  {'total':<40} {sum(res['breakdown'].values()):7.1f} B")


if __name__ == "__main__":
    main()
