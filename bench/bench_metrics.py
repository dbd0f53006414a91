"""/metrics render time as the fleet and the number of problem terminals grow (in process, no HTTP).

    .venv/bin/python bench/bench_metrics.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
from prometheus_client import generate_latest

from collector.app import Collector
from collector.config import Config
from collector.metrics import render_problem_series
from collector.registry import Registry, RegistryEntry
from collector.simulator import make_fleet


def measure(terminals: int, problems: int, repeat: int = 20) -> tuple[float, float, int]:
    """Median and max render time (ms) and body size for a fleet with `problems` terminals in a condition."""
    specs = make_fleet(terminals, ("acq-a", "acq-b", "acq-c"), sites_per_acquirer=50)
    cfg = msgspec.convert({"state": {"snapshot_path": None}}, Config)
    c = Collector(cfg)
    c.fleet.set_registry(
        Registry({s.tid: RegistryEntry(s.tid, s.mid, s.acquirer, s.model, s.site, s.region) for s in specs})
    )
    now = time.time()
    for s in specs[:problems]:
        c.fleet._raise(c.fleet.terminals[s.tid], "hardware_fault", "warning", "printer_paper_out", now, [])
    times = []
    body = b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        body = generate_latest(c.registry) + render_problem_series(c.fleet, cfg.metrics.max_problem_series).encode()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, max(times) * 1000, len(body)


def main() -> None:
    print(f"{'terminals':>10} {'in a problem':>13} {'median ms':>10} {'max ms':>8} {'KiB':>6}")
    for terminals, problems in ((10_000, 100), (100_000, 4_000), (100_000, 100_000), (1_000_000, 1_000_000)):
        med, mx, size = measure(terminals, problems)
        print(f"{terminals:>10} {problems:>13} {med:>10.1f} {mx:>8.1f} {size // 1024:>6}")


if __name__ == "__main__":
    main()
