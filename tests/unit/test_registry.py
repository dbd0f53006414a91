"""The terminal registry's ids: what the wire refuses (check_id), the registry refuses too, so the collector can
trust a registered id without checking it again on every message (decode's `checked_ids`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from collector.fleet.protocol import DecodeError, Heartbeat, decode
from collector.fleet.registry import RegistryError, load_registry

PAN = "4111111111111111"  # a Visa test number: Luhn-valid, a brand's prefix and length
HEARTBEAT = (b'{"tid":"%s","ts":1764510000,"seq":1,"interval_s":30,"txn_count":5,"uploaded_count":5,'
             b'"queue_depth":0,"oldest_queued_ts":null}')


def test_a_card_number_as_an_id_is_refused_and_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "reg.csv"
    path.write_text(f"terminal_id,merchant_id,acquirer\nT1,M1,acq\n{PAN},M2,acq\nT3,{PAN},acq\n")
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    text = str(err.value)
    assert "line 3: terminal_id looks like a card number" in text and "line 4: merchant_id looks like" in text
    assert PAN not in text
    path.write_text("terminal_id,merchant_id,acquirer\nT1,M1,acq\n4111111111111112,M2,acq\n")  # Luhn fails
    assert set(load_registry(path).entries) == {"T1", "4111111111111112"}


def test_checked_ids_skip_only_their_own_topic_check() -> None:
    known = {"T1"}
    assert isinstance(decode("pos/v1/T1/heartbeat", HEARTBEAT % b"T1", checked_ids=known), Heartbeat)
    with pytest.raises(DecodeError) as err:  # an id not among them is checked as always
        decode(f"pos/v1/{PAN}/heartbeat", HEARTBEAT % PAN.encode(), checked_ids=known)
    assert err.value.reason == "card_data" and err.value.tid is None
    with pytest.raises(DecodeError) as err:  # and the payload is still searched for a known id
        decode("pos/v1/T1/heartbeat", (HEARTBEAT % b"T1")[:-1] + b',"note":"%s"}' % PAN.encode(), checked_ids=known)
    assert err.value.reason == "card_data" and err.value.tid == "T1"


def test_entries_share_their_region_and_zone(tmp_path: Path) -> None:
    """Region and time zone live in one shared Place per pair, so an entry keeps six slots (64 B, where a seventh
    took the allocator's 80 B class: bench/bench_memory.py); reading them is unchanged."""
    path = tmp_path / "reg.csv"
    path.write_text("terminal_id,merchant_id,acquirer,model,site,region,tz\n"
                    "T1,M1,acq,A920,s1,north,Europe/Paris\nT2,M2,acq,A920,s2,north,Europe/Paris\n"
                    "T3,M3,acq,A920,s3,south,\n")
    entries = load_registry(path).entries
    assert [(e.region, e.tz) for e in entries.values()] == [("north", "Europe/Paris")] * 2 + [("south", "")]
    assert entries["T1"].place is entries["T2"].place
    assert sys.getsizeof(entries["T1"]) == 64
