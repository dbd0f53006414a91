"""The ledger wired into a collector by support.install: message and transition hooks, and its metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from collector.app import Collector
from collector.config import Config
from collector.fleet.protocol import TxnReceipt, UpstreamBatch, UpstreamTxn
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Transition
from collector.http.routes import build_app
from collector.support.ledger import Ledger, LedgerLimits
from collector.support.routes import LEDGER, LedgerMetrics

NOW = 1_800_000_000.0


def test_metrics_exist_from_the_start_and_count_evictions() -> None:
    ledger = Ledger(LedgerLimits(max_txns_per_terminal=2))
    registry = CollectorRegistry()
    registry.register(LedgerMetrics(ledger))
    for kind in ("txn", "transition"):
        for reason in ("count", "age", "total"):
            assert registry.get_sample_value("posfleet_ledger_evictions_total", {"kind": kind, "reason": reason}) == 0
    for n in range(5):
        ledger.add_receipt("T1", f"T1-{n}", NOW, 1, "EUR", "approved", NOW + n)
    assert registry.get_sample_value("posfleet_ledger_evictions_total", {"kind": "txn", "reason": "count"}) == 3
    assert registry.get_sample_value("posfleet_ledger_entries", {"kind": "txn"}) == 2
    assert registry.get_sample_value("posfleet_ledger_entries", {"kind": "terminals"}) == 1


def test_install_feeds_the_ledger_from_the_collector_hooks() -> None:
    collector = Collector(Config())
    collector.fleet.set_registry(Registry({"T1": RegistryEntry.of("T1", "M1", "acq-a", "A920", "s", "r")}))
    ledger = build_app(collector)[LEDGER]
    t1 = collector.fleet.terminals["T1"]
    receipt = TxnReceipt(txn_id="T1-1", ts=NOW, amount_minor=5, currency="EUR", status="approved", tid="T1")
    stranger = TxnReceipt(txn_id="X-1", ts=NOW, amount_minor=5, currency="EUR", status="approved", tid="X")
    for hook in collector.message_hooks:
        hook(receipt, NOW + 1, t1)
        hook(stranger, NOW + 1, None)  # a receipt from outside the fleet is not kept
        hook(UpstreamBatch(NOW, [UpstreamTxn("T1", "T1-1", NOW), UpstreamTxn("X", "X-2", NOW)], "acq-a"), NOW + 2,
             None)
    [(txn_id, entry)] = ledger.entries("T1", NOW + 3)
    assert (txn_id, entry.received_at, entry.recorded_at) == ("T1-1", NOW + 1, NOW + 2)
    assert set(ledger.txns) == {"T1"}
    for thook in collector.transition_hooks:
        thook([Transition("T1", "offline", True, NOW, "critical", "silent")])
    assert [t.condition for t in ledger.transitions("T1", NOW + 3)] == ["offline"]
    assert collector.prom_registry.get_sample_value("posfleet_ledger_entries", {"kind": "txn"}) == 1
