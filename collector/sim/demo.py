"""`posfleet demo`: a broker (embedded, or the one given), the collector and a simulated fleet with faults,
and a live summary of what the collector found. Nothing else to install."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from collector.app import Collector
from collector.config import Config
from collector.http.routes import terminal_view
from collector.sim.simulator import FAULTS, MIN_APP, Simulator, make_fleet

__all__ = ["DEMO_FAULTS", "demo_config", "run_demo"]

# One terminal per fault, on the first terminals of the fleet; host maintenance on a small third acquirer.
DEMO_FAULTS = [f for f in FAULTS if f not in ("display_fault", "card_reader_fault")]


def demo_config(mqtt_url: str, workdir: Path, http_port: int, interval: float) -> Config:
    """Thresholds scaled to the demo's short heartbeat interval."""
    return msgspec.convert(
        {
            "mqtt": {"url": mqtt_url, "client_id": f"posfleet-demo-{int(time.time())}"},
            "http": {"host": "127.0.0.1", "port": http_port},
            "registry": {"path": str(workdir / "terminals.csv"), "reload_interval_s": 1},
            "state": {"snapshot_path": str(workdir / "state.snapshot"), "eval_interval_s": 0.5},
            "thresholds": {
                "default_interval_s": interval,
                "backlog_queue_depth": 5,
                "backlog_oldest_age_s": 5 * interval,
                "upstream_grace_s": 4 * interval,
                "feed_stale_s": 4 * interval,
                "flapping_window_s": 60 * interval,
            },
            "software_policy": {"*": MIN_APP},
        },
        Config,
    )


async def _embedded_broker(port: int) -> Any:
    from amqtt.broker import Broker

    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("transitions").setLevel(logging.ERROR)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 10_000}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    return broker


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def render(collector: Collector, sim: Simulator, mqtt_url: str, started: float) -> str:
    """The summary screen."""
    fleet, now = collector.fleet, time.time()
    counts: Counter[str] = Counter()
    for tid in fleet.problem:
        for cond in fleet.terminals[tid].conds or {}:
            counts[cond] += 1
    online = sum(n for (_a, _s, c), n in fleet.counts.items() if c == "_online")
    lines = [
        f"posfleet demo — {len(fleet.terminals)} terminals, broker {mqtt_url}, running {now - started:.0f}s",
        f"API      http://127.0.0.1:{collector.http_port}/api/v1/terminals",
        f"metrics  http://127.0.0.1:{collector.http_port}/metrics",
        "",
        f"online {online}   heartbeats sent {sim.heartbeats_sent}   "
        f"stale feeds: {', '.join(a for a in sorted(fleet.feeds) if fleet.feed_stale(a, now)) or 'none'}",
        "",
        "terminals by condition:",
    ]
    for cond in sorted(counts):
        lines.append(f"  {cond:<18} {counts[cond]}")
    if not counts:
        lines.append("  (none yet — conditions need a few heartbeats to be confirmed)")
    lines += ["", f"{'terminal':<9} {'injected fault':<18} {'condition':<18} probable cause"]
    for tid in sorted(fleet.problem):
        view = terminal_view(fleet.terminals[tid], now)
        injected = ",".join(sorted(sim.faults_of(tid))) if tid in sim.terms else "-"
        for c in view["conditions"]:
            cause = c["probable_cause"]
            lines.append(f"{tid:<9} {injected:<18} {c['condition']:<18} {cause[:90]}{'…' if len(cause) > 90 else ''}")
    shut = [tid for tid, t in fleet.terminals.items() if t.status == "shutdown"]
    if shut:
        lines.append(f"\nclean shutdown (not a problem): {', '.join(sorted(shut))}")
    return "\n".join(lines)


async def _demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="posfleet-demo-"))
    broker = None
    mqtt_url = args.mqtt_url
    if not mqtt_url:
        port = _free_port()
        broker = await _embedded_broker(port)
        mqtt_url = f"mqtt://127.0.0.1:{port}"
    specs = make_fleet(args.terminals, ("acq-a", "acq-b")) + make_fleet(4, ("acq-m",), prefix="MT")
    sim = Simulator(mqtt_url, specs, args.interval)
    plan = list(zip((s.tid for s in specs), DEMO_FAULTS, strict=False))
    for tid, fault in plan:
        if fault == "unregistered":
            sim.set_fault(tid, fault)
    sim.write_registry(workdir / "terminals.csv")
    cfg = demo_config(mqtt_url, workdir, args.http_port, args.interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    started = time.time()
    try:
        async with Collector.load(cfg) as collector, sim:
            # Faults start after a few healthy heartbeats, as in the field.
            await asyncio.sleep(3 * args.interval)
            for tid, fault in plan:
                sim.set_fault(tid, fault)
            sim.set_fault("acq-m", "host_maintenance")
            deadline = started + args.duration if args.duration else None
            while not stop.is_set() and (deadline is None or time.time() < deadline):
                screen = render(collector, sim, mqtt_url, started)
                if args.once or not sys.stdout.isatty():
                    print(screen + "\n" + "-" * 100, flush=True)
                else:
                    print("\033[2J\033[H" + screen, flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(args.interval, 2.0))
    finally:
        if broker is not None:
            await broker.shutdown()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of `posfleet demo`."""
    logging.getLogger("collector").setLevel(logging.WARNING)
    return asyncio.run(_demo(args))
