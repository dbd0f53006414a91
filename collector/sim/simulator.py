"""Fleet simulator: terminals speaking protocol v1, acquirer hosts publishing what they recorded, and every
known fault injectable (and clearable) per terminal or per acquirer.

Each terminal completes one transaction per heartbeat interval and, unless a fault stops it, uploads it to its
acquirer's host, which records it and publishes it on its feed. Terminals get their own MQTT connection (with a
last will) when the fleet is small; large fleets share a few connections (no per-terminal will) for benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["FAULTS", "Simulator", "TerminalSpec", "make_fleet"]

log = logging.getLogger(__name__)

# Terminal faults, and the condition each one must produce in the collector.
FAULTS: dict[str, str] = {
    "network_loss": "offline",  # connection dropped: the broker publishes the last will
    "power_loss": "offline",  # silent, no goodbye; comes back with a reboot
    "paper_out": "hardware_fault",
    "printer_fault": "hardware_fault",
    "display_fault": "hardware_fault",
    "card_reader_fault": "hardware_fault",
    "outdated_app": "outdated_software",
    "stuck_uploads": "upload_backlog",
    "host_drops": "upstream_missing",  # the host acks uploads but never records this terminal's transactions
    "unregistered": "unregistered",  # left out of the registry the simulator writes
    "wrong_merchant": "merchant_mismatch",
    "clock_skew": "clock_skew",
    "weak_signal": "weak_signal",
    "reboot_loop": "flapping",
    "shutdown": "",  # clean shutdown: must NOT be a problem
}
ACQUIRER_FAULTS = ("host_maintenance",)  # the acquirer's feed pauses (upstream_feed_stale)

CURRENT_APP = "3.4.1"
OLD_APP = "2.0.7"
MIN_APP = "3.0.0"  # the policy the demo and tests configure: {"*": MIN_APP}


@dataclass(frozen=True, slots=True)
class TerminalSpec:
    """A terminal as the acquirer registered it."""

    tid: str
    mid: str
    acquirer: str
    model: str
    site: str
    region: str


def make_fleet(
    n: int, acquirers: Iterable[str] = ("acq-a", "acq-b"), sites_per_acquirer: int = 3, prefix: str = "T"
) -> list[TerminalSpec]:
    """A deterministic fleet: terminals spread over acquirers and sites, four per merchant."""
    acqs = list(acquirers)
    specs = []
    for i in range(n):
        acq = acqs[i % len(acqs)]
        site = f"{acq}-site{(i // len(acqs)) % sites_per_acquirer}"
        specs.append(
            TerminalSpec(f"{prefix}{i:05d}", f"M{i // 4:05d}", acq, ("A920", "P400")[i % 2], site, site.split("-")[0])
        )
    return specs


@dataclass
class _Term:
    spec: TerminalSpec
    faults: set[str] = field(default_factory=set)
    seq: int = 0
    boot_ts: float = 0.0
    txn_count: int = 0
    uploaded: int = 0
    queued: list[float] = field(default_factory=list)  # terminal-clock times of queued transactions
    client: paho.Client | None = None
    connected: bool = False
    silent: bool = False  # power lost or shut down: no messages at all
    phase: int = 0


def _credentials() -> tuple[str | None, str | None]:
    """Simulator login for an authenticated broker: POSFLEET_MQTT_USERNAME and _PASSWORD or _PASSWORD_FILE."""
    user = os.environ.get("POSFLEET_MQTT_USERNAME")
    password = os.environ.get("POSFLEET_MQTT_PASSWORD")
    path = os.environ.get("POSFLEET_MQTT_PASSWORD_FILE")
    if path:
        with open(path, encoding="utf-8") as fh:
            password = fh.read().strip()
    return user, password


def _new_client(client_id: str, host: str, port: int, will: tuple[str, bytes] | None) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    user, password = _credentials()
    if user:
        client.username_pw_set(user, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    return client


class Simulator:
    """A running simulated fleet. `async with Simulator(...) as sim:`; inject with set_fault/clear_fault."""

    def __init__(
        self,
        mqtt_url: str,
        specs: list[TerminalSpec],
        interval_s: float = 1.0,
        prefix: str = "pos/v1",
        upstream_prefix: str = "acquirer/v1",
        dedicated: bool | None = None,
        gateways: int = 4,
        receipts: bool = True,
        seed: int = 7,
    ) -> None:
        url = urlparse(mqtt_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 1883
        self.interval = interval_s
        self.prefix, self.upstream_prefix = prefix, upstream_prefix
        self.terms = {s.tid: _Term(s, phase=i % 10) for i, s in enumerate(specs)}
        self.dedicated = len(specs) <= 300 if dedicated is None else dedicated
        self.n_gateways = gateways
        self.receipts = receipts
        self.rng = random.Random(seed)
        self.maintenance: set[str] = set()
        self.host_backlog: dict[str, list[dict[str, object]]] = {s.acquirer: [] for s in specs}
        self.recorded: dict[str, set[str]] = {}  # tid -> txn ids the host recorded
        self.dropped: dict[str, set[str]] = {}  # tid -> txn ids the host dropped
        self.completed: dict[str, list[tuple[str, float, int]]] = {}  # tid -> (txn_id, ts, amount)
        # Chosen transactions the host acknowledges but never records (reconciliation tests): by id, or every
        # n-th transaction of every terminal (0 = none).
        self.drop_txn_ids: set[str] = set()
        self.drop_every_nth = 0
        self.sent_seqs: dict[str, list[tuple[int, float]]] = {}  # tid -> (seq, ts) of every heartbeat sent
        self._lock = threading.Lock()
        self._gateways: list[paho.Client] = []
        self._feed_client: paho.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.heartbeats_sent = 0

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def __aenter__(self) -> Simulator:
        await asyncio.to_thread(self._connect_all)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._disconnect_all)

    def _connect_all(self) -> None:
        self._feed_client = _new_client(f"sim-acquirers-{id(self)}", self.host, self.port, None)
        if self.dedicated:
            for term in self.terms.values():
                self._connect_terminal(term)
        else:
            self._gateways = [
                _new_client(f"sim-gw{i}-{id(self)}", self.host, self.port, None) for i in range(self.n_gateways)
            ]
            for term in self.terms.values():
                term.connected = True

    def _connect_terminal(self, term: _Term) -> None:
        tid = term.spec.tid
        will = (f"{self.prefix}/{tid}/status", b'{"state":"offline","reason":"connection_lost"}')
        term.client = _new_client(f"term-{tid}", self.host, self.port, will)
        term.connected = True
        self._publish(term, "status", {"state": "online", "ts": self._ts(term)}, retain=True)

    def _disconnect_all(self) -> None:
        clients = [t.client for t in self.terms.values() if t.client is not None] + self._gateways
        if self._feed_client is not None:
            clients.append(self._feed_client)
        for c in clients:
            c.disconnect()
            c.loop_stop()

    # ---- faults ----------------------------------------------------------------------------------------
    def set_fault(self, target: str, fault: str) -> None:
        """Inject a fault on a terminal (or `host_maintenance` on an acquirer)."""
        if fault in ACQUIRER_FAULTS:
            self.maintenance.add(target)
            return
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join([*FAULTS, *ACQUIRER_FAULTS])}")
        term = self.terms[target]
        with self._lock:
            term.faults.add(fault)
            if fault == "network_loss":
                self._drop_connection(term)
            elif fault == "power_loss":
                term.silent = True
            elif fault == "shutdown":
                self._publish(term, "status", {"state": "offline", "ts": self._ts(term), "reason": "shutdown"},
                              retain=True)
                term.silent = True
                if term.client is not None:
                    term.client.disconnect()
                    term.client.loop_stop()
                    term.client = None
                    term.connected = False

    def clear_fault(self, target: str, fault: str) -> None:
        """Remove a fault; a terminal back from power loss or shutdown reboots (seq starts at 0)."""
        if fault in ACQUIRER_FAULTS:
            self.maintenance.discard(target)
            return
        term = self.terms[target]
        with self._lock:
            term.faults.discard(fault)
            if fault in ("power_loss", "shutdown"):
                term.silent = False
                term.seq = 0
                term.boot_ts = time.time()
            if not term.connected and self.dedicated and "network_loss" not in term.faults:
                self._connect_terminal(term)

    def _drop_connection(self, term: _Term) -> None:
        """Kill the TCP connection without DISCONNECT, as a dead network does: the broker sends the will."""
        client = term.client
        if client is None:
            term.connected = False
            return
        sock = client.socket()
        client.loop_stop()  # stop paho first so it does not reconnect
        if sock is not None:
            try:
                import socket as _s

                sock.shutdown(_s.SHUT_RDWR)  # type: ignore[attr-defined]
            except OSError:
                pass
            sock.close()
        term.client = None
        term.connected = False

    def faults_of(self, tid: str) -> set[str]:
        """Faults currently injected on a terminal."""
        return set(self.terms[tid].faults)

    def write_registry(self, path: str | Path) -> None:
        """The acquirers' registry as CSV, leaving out terminals with the `unregistered` fault."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["terminal_id", "merchant_id", "acquirer", "model", "site", "region"])
            for term in self.terms.values():
                if "unregistered" not in term.faults:
                    s = term.spec
                    w.writerow([s.tid, s.mid, s.acquirer, s.model, s.site, s.region])

    # ---- the fleet's life ------------------------------------------------------------------------------
    def _ts(self, term: _Term) -> float:
        skew = 3600.0 if "clock_skew" in term.faults else 0.0
        return round(time.time() + skew, 3)

    def _publish(self, term: _Term, kind: str, body: dict[str, object], retain: bool = False) -> None:
        client = term.client if self.dedicated else self._gateways[hash(term.spec.tid) % len(self._gateways)]
        if client is None:
            return
        client.publish(f"{self.prefix}/{term.spec.tid}/{kind}", json.dumps(body, separators=(",", ":")), qos=1,
                       retain=retain)

    def _step(self, term: _Term) -> None:
        s, f = term.spec, term.faults
        if term.silent or not term.connected:
            return
        now_ts = self._ts(term)
        if "reboot_loop" in f and term.seq >= 2:
            term.seq = 0
            term.boot_ts = time.time()
            self._publish(term, "status", {"state": "online", "ts": now_ts}, retain=True)
        # One completed transaction per interval.
        term.txn_count += 1
        txn_id = f"{s.tid}-{term.txn_count}"
        amount = 100 + (term.txn_count * 37) % 9900
        self.completed.setdefault(s.tid, []).append((txn_id, now_ts, amount))
        term.queued.append(now_ts)
        if self.receipts:
            self._publish(term, "txn", {"txn_id": txn_id, "ts": now_ts, "amount_minor": amount, "currency": "EUR",
                                        "status": "approved"})
        if "stuck_uploads" not in f:
            # Upload everything queued; the host acknowledges, then records (or drops) each transaction.
            for k in range(len(term.queued)):
                n = term.txn_count - len(term.queued) + k + 1
                tx = {"tid": s.tid, "txn_id": f"{s.tid}-{n}", "ts": term.queued[k]}
                if "host_drops" in f or tx["txn_id"] in self.drop_txn_ids or (
                    self.drop_every_nth and n % self.drop_every_nth == 0
                ):
                    self.dropped.setdefault(s.tid, set()).add(str(tx["txn_id"]))
                else:
                    self.host_backlog[s.acquirer].append(tx)
            term.uploaded += len(term.queued)
            term.queued.clear()
        hb: dict[str, object] = {
            "tid": s.tid,
            "ts": now_ts,
            "seq": term.seq,
            "interval_s": self.interval,
            "txn_count": term.txn_count,
            "uploaded_count": term.uploaded,
            "queue_depth": len(term.queued),
            "oldest_queued_ts": term.queued[0] if term.queued else None,
            "mid": "M-WRONG" if "wrong_merchant" in f else s.mid,
            "model": s.model,
            "app_version": OLD_APP if "outdated_app" in f else CURRENT_APP,
            "os_version": "11",
            "uptime_s": round(time.time() - term.boot_ts, 1),
            "net": {"type": "cellular" if "weak_signal" in f else "wifi",
                    "rssi_dbm": -108 if "weak_signal" in f else -58},
            "power": {"source": "mains", "battery_pct": 100},
            "hw": {
                "printer": "fault" if "printer_fault" in f else ("paper_out" if "paper_out" in f else "ok"),
                "display": "fault" if "display_fault" in f else "ok",
                "card_reader": "fault" if "card_reader_fault" in f else "ok",
            },
        }
        self._publish(term, "heartbeat", hb)
        self.sent_seqs.setdefault(s.tid, []).append((term.seq, now_ts))
        self.heartbeats_sent += 1
        term.seq += 1

    def _publish_feeds(self) -> None:
        assert self._feed_client is not None
        for acq, backlog in self.host_backlog.items():
            if acq in self.maintenance:
                continue  # the host is in maintenance: nothing is published, records wait
            txns, self.host_backlog[acq] = backlog, []
            for tx in txns:
                self.recorded.setdefault(str(tx["tid"]), set()).add(str(tx["txn_id"]))
            # An empty batch is the feed's keepalive: "alive, nothing new".
            for i in range(0, max(len(txns), 1), 1000):
                body = {"ts": round(time.time(), 3), "txns": txns[i : i + 1000]}
                self._feed_client.publish(f"{self.upstream_prefix}/{acq}/transactions",
                                          json.dumps(body, separators=(",", ":")), qos=1)

    async def _run(self) -> None:
        for term in self.terms.values():
            term.boot_ts = time.time()
        slot, slots = 0, 10
        while True:
            with self._lock:
                for term in self.terms.values():
                    if term.phase == slot:
                        self._step(term)
                if slot == slots - 1:
                    self._publish_feeds()
            slot = (slot + 1) % slots
            await asyncio.sleep(self.interval / slots)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `posfleet simulate`."""
    p.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="broker (default mqtt://127.0.0.1:1883)")
    p.add_argument("--terminals", type=int, default=20, help="fleet size (default 20)")
    p.add_argument("--interval", type=float, default=5.0, help="heartbeat interval in seconds (default 5)")
    p.add_argument("--acquirers", default="acq-a,acq-b", help="comma-separated acquirer ids")
    p.add_argument(
        "--fault", action="append", default=[], metavar="KIND=ID[,ID...]",
        help=f"inject a fault; kinds: {', '.join([*FAULTS, *ACQUIRER_FAULTS])} (host_maintenance takes acquirers)",
    )
    p.add_argument("--registry-out", help="write the registry CSV here (without `unregistered` terminals)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = until Ctrl-C)")


def parse_faults(items: list[str], known_ids: set[str]) -> list[tuple[str, str]]:
    """`KIND=ID,ID` strings -> (target, kind) pairs, with clear errors."""
    out = []
    for item in items:
        kind, _, ids = item.partition("=")
        if kind not in FAULTS and kind not in ACQUIRER_FAULTS:
            raise ValueError(f"--fault {item!r}: unknown kind {kind!r}")
        for target in filter(None, ids.split(",")):
            if kind not in ACQUIRER_FAULTS and target not in known_ids:
                raise ValueError(f"--fault {item!r}: no terminal {target!r} in the simulated fleet")
            out.append((target, kind))
    return out


def run_cli(args: argparse.Namespace) -> int:
    """`posfleet simulate`."""
    specs = make_fleet(args.terminals, args.acquirers.split(","))
    try:
        faults = parse_faults(args.fault, {s.tid for s in specs})
    except ValueError as err:
        print(f"posfleet simulate: {err}")
        return 2

    async def main() -> None:
        sim = Simulator(args.mqtt_url, specs, args.interval)
        for target, kind in faults:
            if kind == "unregistered":
                sim.set_fault(target, kind)
        if args.registry_out:
            sim.write_registry(args.registry_out)
        async with sim:
            for target, kind in faults:
                sim.set_fault(target, kind)
            print(f"simulating {len(specs)} terminals every {args.interval}s against {args.mqtt_url}; Ctrl-C stops")
            if args.duration:
                await asyncio.sleep(args.duration)
            else:
                await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
