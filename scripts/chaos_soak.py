#!/usr/bin/env python3
"""Chaos soak (not in CI): Mosquitto + the collector + a simulated fleet for `--duration` seconds, with faults
injected at random, then a report of RSS over time, /metrics series count and heartbeats lost by seq.

Faults: broker restart (SIGTERM) and crash (SIGKILL), collector kill -9 (and restart), the collector's link
black-holed (half-open, through tests.faults.BlackholeProxy) for two keepalives, a flood of malformed payloads,
a flood of unknown terminal ids. Heartbeats are counted by seq as the collector applied them: its history writer
points at a tests.faults.LineSink. A kill -9 also loses the history the writer had not flushed yet (at most
`influx.flush_interval_s` of heartbeats, see docs/reliability.md): those are reported apart.

    .venv/bin/python scripts/chaos_soak.py --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collector.sim.simulator import Simulator, make_fleet  # noqa: E402
from tests.faults import (  # noqa: E402
    BlackholeProxy,
    LineSink,
    lost_and_extra,
    metric_sample,
    publish_all,
    restart_mosquitto,
    rss_bytes,
    series_count,
    start_deploy_mosquitto,
    terminal_views,
)
from tests.harness.core import Process, free_port, start_collector, wait_until, write_collector_config  # noqa: E402

FAULTS = ("broker_restart", "broker_kill", "collector_kill", "blackhole", "malformed_flood", "unknown_flood")
KEEPALIVE_S = 5
FLUSH_S = 0.2


def malformed(n: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """Bad JSON, too large, too deep, bad ids and card data, from senders that are not in the fleet."""
    out = []
    for _ in range(n):
        tid = f"X{rng.randrange(100):04d}"
        out.append(rng.choice([
            (f"pos/v1/{tid}/heartbeat", b'{"tid": "' + tid.encode() + b'", "ts": 1'),
            (f"pos/v1/{tid}/heartbeat", json.dumps({"tid": tid, "pad": "x" * 5000}).encode()),
            (f"pos/v1/{tid}/heartbeat", b'{"a":' * 64 + b"1" + b"}" * 64),
            (f"pos/v1/{tid}.bad id/heartbeat", b"{}"),
            (f"pos/v1/{tid}/heartbeat", json.dumps({"tid": tid, "os_version": "4111 1111 1111 1111"}).encode()),
        ]))
    return out


def unknown(n: int, start: int) -> list[tuple[str, bytes]]:
    """Valid heartbeats from terminal ids nobody registered."""
    return [(f"pos/v1/U{i:07d}/heartbeat", json.dumps({
        "tid": f"U{i:07d}", "ts": round(time.time(), 3), "seq": 0, "interval_s": 30.0, "txn_count": 0,
        "uploaded_count": 0, "queue_depth": 0, "oldest_queued_ts": None}).encode()) for i in range(start, start + n)]


class Soak:
    """Everything running, the faults, and what was measured."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.rng = random.Random(args.seed)
        self.broker = start_deploy_mosquitto()
        self.proxy = BlackholeProxy(self.broker.port)
        self.sink = LineSink()
        self.specs = make_fleet(args.terminals)
        self.sim = Simulator(f"mqtt://127.0.0.1:{self.broker.port}", self.specs, args.interval, receipts=False,
                             dedicated=False)
        self.sim.write_registry(workdir / "terminals.csv")
        self.http_port = free_port()
        self.config = write_collector_config(
            workdir, self.proxy.port, self.http_port,
            mqtt={"url": f"mqtt://127.0.0.1:{self.proxy.port}", "client_id": "chaos-soak", "keepalive_s": KEEPALIVE_S,
                  "reconnect_min_s": 1, "reconnect_max_s": 2},
            thresholds={"default_interval_s": args.interval},
            state={"snapshot_path": str(workdir / "state.snapshot"), "snapshot_interval_s": 2, "eval_interval_s": 0.5,
                   "spool_dir": str(workdir / "spool")},
            influx={"enabled": True, "url": self.sink.url, "flush_interval_s": FLUSH_S, "backoff_initial_s": 0.2,
                    "backoff_max_s": 2.0},
        )
        self.collector: Process = start_collector(workdir, self.config, self.http_port)
        self.kills: list[float] = []  # when the collector was killed (history of the last flush interval is lost)
        self.broker_kills: list[tuple[float, float]] = []  # (killed, connected again): what was not autosaved
        self._deck: list[str] = []
        self.samples: list[tuple[float, float, int, int]] = []  # (t, RSS MiB, series, heartbeats sent)
        self.faults: list[tuple[float, str, str]] = []  # (t, fault, outcome)
        self.false_alarms: dict[str, set[str]] = {}
        self.unknown_next = 0
        self.t0 = time.monotonic()

    def t(self) -> float:
        return time.monotonic() - self.t0

    def ready(self) -> bool:
        return metric_sample(self.http_port, "posfleet_mqtt_connected") == 1

    def sample(self) -> None:
        """RSS and series count now; conditions on the (healthy) fleet remembered as false alarms."""
        try:
            series, _ = series_count(self.http_port)
            rss = rss_bytes(self.collector.proc.pid) / 2**20
            for tid, view in terminal_views(self.http_port).items():
                if tid in self.sim.terms and view["conditions"]:
                    self.false_alarms.setdefault(tid, set()).update(c["condition"] for c in view["conditions"])
        except (OSError, AssertionError):
            return  # the collector is restarting
        self.samples.append((self.t(), rss, series, self.sim.heartbeats_sent))

    def inject(self, fault: str) -> str:
        """Inject one fault and wait for the system to be back; returns what happened (blocking: run in a thread)."""
        started = time.monotonic()
        if fault in ("broker_restart", "broker_kill"):
            how = signal.SIGTERM if fault == "broker_restart" else signal.SIGKILL
            killed = time.time()
            self.broker = restart_mosquitto(self.broker, how)
            self.proxy.target_port = self.broker.port
            if how == signal.SIGKILL:
                wait_until(self.ready, 60, "the collector connected again", 0.1)
                self.broker_kills.append((killed, time.time()))
        elif fault == "collector_kill":
            self.collector.stop(signal.SIGKILL)
            self.kills.append(time.time())
            self.collector = start_collector(self.workdir, self.config, self.http_port)
        elif fault == "blackhole":
            self.proxy.blackhole()
            wait_until(lambda: not self.ready(), 4 * KEEPALIVE_S, "the black hole noticed", 0.1)
            noticed = time.monotonic() - started
            self.proxy.restore()
            wait_until(self.ready, 60, "reconnected after the black hole", 0.1)
            return f"noticed after {noticed:.1f} s, back after {time.monotonic() - started:.1f} s"
        elif fault == "malformed_flood":
            n = publish_all(self.broker.port, malformed(2000, self.rng), pace_per_s=2000)
            return f"{n} malformed payloads"
        elif fault == "unknown_flood":
            n = publish_all(self.broker.port, unknown(20_000, self.unknown_next))
            self.unknown_next += n
            return f"{n} unknown ids ({self.unknown_next} so far)"
        wait_until(self.ready, 60, "the collector connected again", 0.1)
        return f"back after {time.monotonic() - started:.1f} s"

    async def run(self) -> None:
        async with self.sim:
            await asyncio.to_thread(wait_until, lambda: len(self.sink.heartbeat_seqs()) == len(self.specs), 60,
                                    "every terminal heard", 0.5)
            next_fault = self.t() + self.rng.expovariate(1 / self.args.fault_every)
            next_sample = 0.0
            while self.t() < self.args.duration:
                if self.t() >= next_sample:
                    await asyncio.to_thread(self.sample)
                    next_sample = self.t() + self.args.sample_every
                if self.t() >= next_fault:
                    if not self._deck:  # every kind in turn, in a random order: none is left out by chance
                        self._deck = self.rng.sample(FAULTS, len(FAULTS))
                    fault = self._deck.pop()
                    at = self.t()
                    outcome = await asyncio.to_thread(self.inject, fault)
                    self.faults.append((at, fault, outcome))
                    print(f"[{at:6.1f} s] {fault}: {outcome}", flush=True)
                    next_fault = self.t() + self.rng.expovariate(1 / self.args.fault_every)
                await asyncio.sleep(0.5)
        await asyncio.to_thread(self.sample)

    def finish(self) -> int:
        """Let the last heartbeats land, stop cleanly, print the report; exit status 1 on an unexplained loss or a
        heartbeat applied twice."""
        sent_ts = {(tid, seq): ts for tid, seqs in self.sim.sent_seqs.items() for seq, ts in seqs}

        def explained() -> tuple[set[tuple[str, int]], set[tuple[str, int]], set[tuple[str, int]]]:
            """(all lost, lost by a collector kill -9's unflushed history, lost by a broker SIGKILL)"""
            lost, _ = lost_and_extra(self.sim.sent_seqs, self.sink.heartbeat_seqs())
            every = {(t, s) for t, seqs in lost.items() for s in seqs}
            # applied before a kill -9 but not yet flushed to history: the state had them, history lost them
            at_kill = {k for k in every if any(c - FLUSH_S - 1.5 <= sent_ts[k] <= c for c in self.kills)}
            # accepted by a broker that was then killed before its autosave
            at_crash = {k for k in every - at_kill if any(a - 2 <= sent_ts[k] <= b + 2 for a, b in self.broker_kills)}
            return every, at_kill, at_crash

        try:  # the last heartbeats land (the persistent session delivers what the collector missed)
            wait_until(lambda: not (lambda e: e[0] - e[1] - e[2])(explained()), 60, "the last heartbeats", 0.5)
        except TimeoutError as err:
            print(f"warning: {err}")
        self.collector.stop()
        every, at_kill, at_crash = explained()
        _, extra = lost_and_extra(self.sim.sent_seqs, self.sink.heartbeat_seqs())
        n_lost = len(every)
        sent = self.sim.heartbeats_sent
        print("\n== chaos soak report ==")
        print(f"duration {self.args.duration:.0f} s, {len(self.specs)} terminals every {self.args.interval} s "
              f"({len(self.specs) / self.args.interval:.0f} heartbeats/s), seed {self.args.seed}")
        counts = {f: sum(1 for _, g, _ in self.faults if g == f) for f in FAULTS}
        print(f"faults injected: {len(self.faults)} " + json.dumps(counts))
        print("RSS and /metrics over time:")
        print("    t (s)   RSS (MiB)   series   heartbeats sent")
        step = max(1, len(self.samples) // 12)
        for t, rss, series, hb in self.samples[::step] + ([self.samples[-1]] if self.samples else []):
            print(f"  {t:7.0f}   {rss:9.1f}   {series:6d}   {hb:15d}")
        print(f"heartbeats sent {sent}; lost by seq {n_lost} ({n_lost / max(sent, 1):.3%}): "
              f"{len(at_kill)} within {FLUSH_S} s (+1.5 s margin) before a collector kill -9 (history not flushed), "
              f"{len(at_crash)} during a broker SIGKILL (not autosaved), {n_lost - len(at_kill) - len(at_crash)} "
              f"otherwise; applied twice {sum(len(v) for v in extra.values())}")
        print(f"healthy terminals that showed a condition: {len(self.false_alarms)} "
              f"{dict(list(self.false_alarms.items())[:10])}")
        return 1 if every - at_kill - at_crash or extra else 0

    def close(self) -> None:
        self.collector.stop()
        self.proxy.close()
        self.sink.close()
        self.broker.stop()
        shutil.rmtree(self.broker.workdir, ignore_errors=True)


def main() -> int:
    """Run the soak."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of soak (default 600)")
    p.add_argument("--terminals", type=int, default=400, help="simulated fleet size (default 400)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="heartbeat interval, s (default 5: offline after 15 s, longer than any injected outage)")
    p.add_argument("--fault-every", type=float, default=20.0, help="mean seconds between faults (default 20)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS/series samples")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="posfleet-soak-"))
    soak = Soak(args, workdir)
    try:
        asyncio.run(soak.run())
        return soak.finish()
    finally:
        soak.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
