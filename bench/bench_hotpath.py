"""CPU per heartbeat on the collector's hot path, in one process: `Collector.process` (decode, card-data check,
state, conditions, activity learning, counters) against the naive peer's `json.loads` + dict store, on payloads
shaped like ../shared/bench/fleetgen.py's (100,000 terminals on 2,000 sites, signal drifting across the weak
threshold, small upload queues, the odd paper-out).

No broker and no socket: what is left is what posfleet does per message beyond reading it, the part that decides
"posfleet >= naive" in bench/peers.sh's burst and drain modes (both spend about the same on paho's packet parsing).
The machine is a VM with noisy clocks: each figure is the best of `--repeat` passes over fresh messages.

    .venv/bin/python bench/bench_hotpath.py                  # best of 5 passes of 100,000 heartbeats
    .venv/bin/python bench/bench_hotpath.py --profile        # where the time goes (cProfile, sorted by own time)
    bench/callgrind_hotpath.sh                               # instructions per heartbeat: repeatable on a busy VM
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collector.app import Collector  # noqa: E402
from collector.config import load_config  # noqa: E402
from collector.fleet.protocol import decode  # noqa: E402
from collector.ingest.mqtt import Inbound  # noqa: E402

# fleetgen's heartbeat, field for field (../shared/bench/fleetgen.py, _REST).
_HEAD = b'{"tid":"%s","mid":"M%05d","seq":'
_REST = (
    b'%d,"ts":%.3f,"interval_s":30,"txn_count":%d,"uploaded_count":%d,"queue_depth":%d,'
    b'"oldest_queued_ts":%s,"model":"A920","app_version":"4.2.1","net":{"type":"%s","rssi_dbm":%d},'
    b'"power":{"source":"%s","battery_pct":%d},"hw":{"printer":"%s","display":"ok","card_reader":"ok"}}'
)
_NETS = (b"cellular", b"cellular", b"cellular", b"wifi", b"ethernet")
_PRINTER = (b"ok",) * 49 + (b"paper_out",)


def heartbeats(terminals: int, seq: int, ts: float) -> list[Inbound]:
    """One round of heartbeats, one per terminal, as fleetgen would publish them in round `seq`."""
    out = []
    for i in range(terminals):
        tid = b"T%07d" % i
        q = (seq * 7 + i) % 3 if (i + seq) % 3 == 0 else 0
        txn = (i * 2654435761) % 100000 + seq * 3
        payload = _HEAD % (tid, i // 20) + _REST % (
            seq, ts, txn, txn - q, q, b"null" if q == 0 else b"%.3f" % (ts - 30.0 * q),
            _NETS[i % 5], -55 - (i + seq) % 45,
            b"mains" if i % 10 else b"battery", 100 - (seq + i) % 60 if i % 10 == 0 else 100,
            _PRINTER[(i + seq) % 50],
        )
        out.append(Inbound(f"pos/v1/{tid.decode()}/heartbeat", payload, False, 0, 1, ts))
    return out


def collector(workdir: Path, terminals: int, sites: int) -> Collector:
    """A collector as bench/peers.sh configures it (registry of `terminals` on `sites`, no history)."""
    per_site = max(1, terminals // sites)
    registry = workdir / "terminals.csv"
    with registry.open("w") as fh:
        fh.write("terminal_id,merchant_id,acquirer,model,site,region\n")
        for i in range(terminals):
            site = min(i // per_site, sites - 1)
            fh.write(f"T{i:07d},M{i // 20:05d},acq-{'abcd'[site % 4]},A920,S{site:06d},r{site % 10}\n")
    conf = workdir / "collector.yaml"
    conf.write_text(f"mqtt:\n  url: mqtt://127.0.0.1:1\nregistry:\n  path: {registry}\nstate:\n  snapshot_path: ''\n")
    return Collector.load(load_config(conf))


def cpu_per_message(fn: Any, items: list[Inbound]) -> float:
    """CPU seconds per item of `fn(item)` over the items, in microseconds."""
    t0 = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - t0) / len(items) * 1e6


def main() -> None:
    """Run the passes and print the figures (and, with --json, write them)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--terminals", type=int, default=100_000)
    ap.add_argument("--sites", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=5, help="passes over fresh rounds of heartbeats (best is kept)")
    ap.add_argument("--profile", action="store_true", help="one pass under cProfile instead of timing")
    ap.add_argument("--only", choices=["process", "decode", "naive", "none"],
                    help="time only this (e.g. under callgrind; none: only generate the heartbeats)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        c = collector(Path(tmp), args.terminals, args.sites)
        t0 = time.time()
        for item in heartbeats(args.terminals, 0, t0):  # first heartbeats: terminals come online
            c.process(item)
        gc.collect()
        gc.freeze()  # as Collector.__aenter__ does with the registry and the restored state
        state: dict[str, Any] = {}

        def decode_one(item: Inbound) -> None:
            decode(item.topic, item.payload, checked_ids=c.fleet.terminals)

        def naive(item: Inbound) -> None:
            doc = json.loads(item.payload)
            state[doc["tid"]] = doc

        if args.profile:
            items = heartbeats(args.terminals, 1, t0 + 30)
            prof = cProfile.Profile()
            prof.enable()
            for item in items:
                c.process(item)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            return
        figures: dict[str, list[float]] = {"process": [], "decode": [], "naive": []}
        for r in range(1, args.repeat + 1):
            items = heartbeats(args.terminals, r, t0 + 30 * r)
            if args.only in (None, "decode"):
                figures["decode"].append(cpu_per_message(decode_one, items))
            if args.only in (None, "naive"):
                figures["naive"].append(cpu_per_message(naive, items))
            if args.only in (None, "process"):
                figures["process"].append(cpu_per_message(c.process, items))
            del items
        if args.only or not args.repeat:
            print({k: min(v) for k, v in figures.items() if v})
            return
        best = {k: min(v) for k, v in figures.items()}
        print(f"{args.terminals:,} terminals on {args.sites:,} sites, best of {args.repeat} passes (CPU µs/heartbeat):")
        print(f"  posfleet Collector.process  {best['process']:6.2f}   (decode alone {best['decode']:.2f})")
        print(f"  naive json.loads + dict     {best['naive']:6.2f}")
        print(f"  ratio process / naive       {best['process'] / best['naive']:6.2f}")
        if args.json:
            args.json.write_text(json.dumps({"best_us": best, "passes_us": figures, "args": vars(args)}, default=str))


if __name__ == "__main__":
    main()
