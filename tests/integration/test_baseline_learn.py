"""`posfleet baseline learn` against a real InfluxDB 1.6 (InfluxQL) and a real VictoriaMetrics (written through the
InfluxDB v2 write API as the collector writes, read back with its export API): heartbeats written as the
collector writes them, read back by the real CLI process into the snapshot, give byte for byte the baselines live
learning gave on the same heartbeats; an unreachable database is a clear error and writes nothing."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from collector.config import Config, load_config
from collector.fleet.registry import load_registry
from collector.fleet.snapshot import load_snapshot
from collector.fleet.state import Fleet, Transition
from exporters.history.lines import heartbeat_line, tag_set
from tests.harness.activity import heartbeat
from tests.harness.core import ROOT, free_port
from tests.harness.tsdb import InfluxD, VictoriaMetrics

pytestmark = pytest.mark.integration
MON = 1_772_409_600.0  # Monday 2026-03-02 00:00 UTC
DAYS = 9


def shop_rate(open_h: float, close_h: float, per_h: float, tz_offset_h: float) -> object:
    def rate(t: float) -> float:
        local_h = ((t / 3600.0) + tz_offset_h) % 24
        return per_h if open_h <= local_h < close_h else 0.0
    return rate


def write_config(tmp_path: Path, url: str) -> Path:
    (tmp_path / "terminals.csv").write_text(
        "terminal_id,merchant_id,acquirer,model,site,region,tz\n"
        "BER,M1,acq,A920,s1,eu,Europe/Berlin\nKOL,M2,acq,A920,s2,in,Asia/Kolkata\nDEF,M3,acq,A920,s3,us,\n"
    )
    cfg = {
        "registry": {"path": str(tmp_path / "terminals.csv")},
        "state": {"snapshot_path": str(tmp_path / "state.snapshot")},
        "influx": {"url": url, "bucket": "posfleet"},
        "activity": {"acquirer_tz": {"acq": "America/New_York"}},
    }
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def learn_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector.cli", "baseline", "learn", "--config", str(config), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def write_v2(url: str, body: str) -> None:
    """The collector's write path: InfluxDB line protocol to /api/v2/write."""
    req = urllib.request.Request(f"{url}/api/v2/write?org=posfleet&bucket=posfleet&precision=ns",
                                 data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 204, r.status


@pytest.mark.parametrize("reader", ["influxql", "export"])
def test_backfill_equals_live_learning(tmp_path: Path, reader: str, request: pytest.FixtureRequest) -> None:
    if reader == "influxql":
        influxd: InfluxD = request.getfixturevalue("influxd")
        url, write = influxd.url, influxd.write_v1
    else:
        vm: VictoriaMetrics = request.getfixturevalue("victoria_metrics")
        url = vm.url

        def write(body: str) -> None:
            write_v2(vm.url, body)
    config = write_config(tmp_path, url)
    cfg: Config = load_config(config)
    live = Fleet(cfg, started_at=MON, registry=load_registry(tmp_path / "terminals.csv"))
    rnd = random.Random(7)
    rates = {"BER": shop_rate(8, 19, 25, 1), "KOL": shop_rate(10.5, 21, 12, 5.5), "DEF": shop_rate(9, 17, 4, -5)}
    lines: list[str] = []
    out: list[Transition] = []
    for tid, rate in rates.items():
        t, acc, seq = MON, 0.0, 0
        while t < MON + DAYS * 86_400:
            if tid == "BER" and MON + 3 * 86_400 <= t < MON + 3 * 86_400 + 3 * 3600:
                t += 60  # switched off for three hours: an unheard stretch, not learned
                continue
            rx = float(round(t))
            hb = heartbeat(tid, seq, math.floor(acc), rx, interval_s=60)
            live.on_heartbeat(hb, rx, out)
            lines.append(heartbeat_line(hb, rx, tag_set(tid, f"M-{tid}", "acq", "A920")))
            acc += rate(t) * 60 / 3600 * rnd.uniform(0.3, 1.7)  # type: ignore[operator]
            seq += 1
            t += 60 + rnd.choice((-2, 0, 0, 3))  # heartbeats a few seconds early or late
    for i in range(0, len(lines), 5000):
        write("\n".join(lines[i : i + 5000]))
    if reader == "export":
        urllib.request.urlopen(f"{url}/internal/force_flush", timeout=10).read()

    done = learn_cli(config, "--until", str(MON + DAYS * 86_400), "--days", str(DAYS + 1), "--window-hours", "12",
                     "--reader", reader)
    assert done.returncode == 0, done.stderr
    assert "baseline learn: window 1/20" in done.stderr and "window 20/20" in done.stderr, "progress on stderr"
    assert f"learned {len(lines)} heartbeats of 3 terminals (3 now evaluated" in done.stdout

    restored = load_snapshot(tmp_path / "state.snapshot")
    assert restored.activity is not None
    backfilled = Fleet(cfg, started_at=MON, registry=load_registry(tmp_path / "terminals.csv"),
                       restored=restored.state, baselines=restored.activity)
    for tid in rates:
        want = live.activity.store.record(live.activity.slot_of(tid))
        got = backfilled.activity.store.record(backfilled.activity.slot_of(tid))
        assert any(want[:48]) and live.activity.store.evaluated(live.activity.slot_of(tid)), tid
        assert got == want, f"{tid}: backfilled baseline differs from live learning"
    # The three zones were applied: Berlin's shop does not trade at the hours Kolkata's does.
    rates_of = live.activity.store.rates
    assert rates_of(live.activity.slot_of("BER")) != rates_of(live.activity.slot_of("KOL"))


def test_unreachable_influxdb_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, url)
    done = learn_cli(config, "--days", "1")
    assert done.returncode == 1
    assert f"cannot reach InfluxDB at {url}" in done.stderr and "nothing was written" in done.stderr
    assert not (tmp_path / "state.snapshot").exists()
    done = learn_cli(config, "--days", "1", "--reader", "export")
    assert done.returncode == 1 and f"cannot reach VictoriaMetrics at {url}" in done.stderr
    assert not (tmp_path / "state.snapshot").exists()
    bad = learn_cli(config, "--days", "0")
    assert bad.returncode == 2 and "--days" in bad.stderr
