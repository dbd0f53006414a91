"""/metrics on a fleet shaped like the field's: many sites, few of them in a problem.

    .venv/bin/python bench/bench_metrics.py --terminals 100000 --sites 30000 --problems 2000
    .venv/bin/python bench/bench_metrics.py --terminals 1000000 --sites 300000 --problems 2000

Builds a registered fleet (3 acquirers, `--sites` sites, terminals spread evenly, every terminal heard once),
puts `--problems` terminals on distinct sites into a condition (offline, hardware fault, weak signal in turn) and
one site into a mass outage, then:
- render: the whole body as the route builds it (`take_view` + `render_exposition`, here in one go), median and
  max over `--repeat` renders, and the copy's share of it (`take_view` alone); once as a first scrape formats it
  and once as the next scrapes do, with each site's and terminal's text kept from the last (SparseLines);
- size and series count of the body;
- loop stall: the real aiohttp /metrics listener served on this loop, scraped over HTTP from another process
  while a probe task asks to wake every 1 ms; the longest it woke late during the scrapes is the longest time
  a scrape kept the loop (and so ingest) from running.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
from aiohttp import web

from collector.app import Collector
from collector.config import Config
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Transition
from collector.http.metrics import render_exposition, take_view
from collector.http.routes import build_metrics_app

ACQUIRERS = ("acq-a", "acq-b", "acq-c")
PROBLEMS = (("offline", "critical", "silent"), ("hardware_fault", "warning", "printer_paper_out"),
            ("weak_signal", "warning", "4g"))


SCRAPER = """
import sys, urllib.request
for _ in range(int(sys.argv[2])):
    with urllib.request.urlopen(sys.argv[1], timeout=60) as resp:
        resp.read()
"""


def build(terminals: int, sites: int, problems: int) -> Collector:
    """A collector whose fleet has `terminals` registered on `sites` sites, `problems` of them in a condition."""
    cfg = msgspec.convert({"state": {"snapshot_path": None}}, Config)
    c = Collector.load(cfg)
    entries = {}
    for i in range(terminals):
        site = i % sites
        acq = ACQUIRERS[site % len(ACQUIRERS)]
        tid = f"T{i:07d}"
        entries[tid] = RegistryEntry.of(tid, f"M{site:06d}", acq, "A920", f"{acq}-s{site:06d}", "eu")
    fleet = c.fleet
    fleet.set_registry(Registry(entries))
    now = time.time()
    for t in fleet.terminals.values():  # heard once, online
        t.last_rx = now
        fleet._count(t.acquirer, t.site, "_online", 1)
    out: list[Transition] = []
    # One terminal per site in a condition (distinct sites), the first site wholly offline (a mass outage).
    tids = list(entries)
    for n in range(problems):
        cond, severity, detail = PROBLEMS[n % len(PROBLEMS)]
        t = fleet.terminals[tids[(n * (sites // max(problems, 1) or 1)) % terminals]]
        if t.conds is None or cond not in t.conds:
            fleet._raise(t, cond, severity, detail, now, out)
    for i in range(0, min(terminals, 10 * sites), sites):  # every terminal of site 0 (up to 10)
        t = fleet.terminals[tids[i]]
        if t.conds is None or "offline" not in t.conds:
            fleet._raise(t, "offline", "critical", "silent", now, out)
    fleet.mass_tick(now)
    fleet.mass_tick(now + 2)
    # As Collector.__aenter__ does at start: the long-lived registry and state leave the GC's generations, so a
    # full collection does not walk them (a pause the scrape would otherwise be blamed for).
    gc.collect()
    gc.freeze()
    return c


def measure_render(c: Collector, repeat: int, kept: bool) -> tuple[float, float, float, bytes]:
    """Median and max whole-render time (ms), median loop share (ms), and the body. `kept`: as the route renders,
    through the collector's SparseLines (what the last scrape formatted is kept; nothing changed here since), else
    as a first scrape (every site's and terminal's text formatted)."""
    totals, views, body = [], [], b""
    cap = c.cfg.metrics.max_problem_series
    for _ in range(repeat):
        t0 = time.perf_counter()
        view = c.fleet_collector.view() if kept else take_view(c.fleet, cap, time.time())
        t1 = time.perf_counter()
        body = render_exposition(c.prom_registry, view)
        totals.append(time.perf_counter() - t0)
        views.append(t1 - t0)
    return statistics.median(totals) * 1e3, max(totals) * 1e3, statistics.median(views) * 1e3, body


async def loop_stall(c: Collector, scrapes: int) -> tuple[list[float], list[float]]:
    """Probe lateness (ms, sorted) with no scrape, and during `scrapes` HTTP scrapes of the real listener."""
    runner = web.AppRunner(build_metrics_app(c), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    late: list[float] = []

    async def probe(stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - t0 - 0.001) * 1e3)

    stop = asyncio.Event()
    task = asyncio.create_task(probe(stop))
    await asyncio.sleep(1.0)
    idle = sorted(late)
    late.clear()

    def scrape() -> None:
        # From another process: a client thread in this one would compete with the loop for the GIL.
        url = f"http://127.0.0.1:{port}/metrics"
        subprocess.run([sys.executable, "-c", SCRAPER, url, str(scrapes)], check=True, timeout=600)

    thread = threading.Thread(target=scrape)
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.05)
    stop.set()
    await task
    await runner.cleanup()
    return idle, sorted(late)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terminals", type=int, default=100_000)
    ap.add_argument("--sites", type=int, default=30_000)
    ap.add_argument("--problems", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    c = build(args.terminals, args.sites, args.problems)
    print(f"fleet of {args.terminals:,} terminals on {args.sites:,} sites built in {time.perf_counter() - t0:.1f} s")
    med, mx, view_ms, body = measure_render(c, args.repeat, kept=False)
    kept_med, kept_mx, _, kept_body = measure_render(c, args.repeat, kept=True)
    assert kept_body == body, "the kept text is the text formatted afresh"
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    idle, stall = asyncio.run(loop_stall(c, args.scrapes))
    print(f"problem terminals {len(c.fleet.problem):,}, problem sites {len(c.fleet.problem_sites):,}, "
          f"mass offline {len(c.fleet.mass_offline())}")
    print(f"body {len(body) / 1e6:.3f} MB, {series:,} series")
    print(f"render (copy + text), first scrape: median {med:.1f} ms, max {mx:.1f} ms; "
          f"copy alone: median {view_ms:.2f} ms")
    print(f"render, next scrapes (text kept, nothing changed): median {kept_med:.1f} ms, max {kept_mx:.1f} ms")
    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    print(f"loop stall during {args.scrapes} HTTP scrapes: longest {stall[-1]:.1f} ms, p99 {pct(stall, 0.99):.1f} ms "
          f"(idle loop, no scrape: longest {idle[-1]:.1f} ms, p99 {pct(idle, 0.99):.1f} ms)")


if __name__ == "__main__":
    main()
