"""Protocol v1: typed messages and `decode(topic, payload, received_at)`, a pure function.

Every rejection raises `DecodeError` with one reason out of `REJECT_REASONS`; the raw payload never appears in
the error (it may hold card data or garbage), only the reason and a short, safe detail.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "REJECT_REASONS",
    "DecodeError",
    "Heartbeat",
    "Message",
    "Status",
    "TxnReceipt",
    "UpstreamBatch",
    "UpstreamTxn",
    "decode",
    "find_card_number",
]

MAX_PAYLOAD_BYTES: Final = 4096
ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE: Final = re.compile(ID_PATTERN)

# Plausible Unix-second range: before 2000 or after 2100 is a broken clock or a unit error (ms), not skew.
TS_MIN: Final = 946_684_800.0
TS_MAX: Final = 4_102_444_800.0
COUNTER_MAX: Final = 2**53  # JSON numbers above this lose precision in most firmware languages.

Id = Annotated[str, Meta(pattern=ID_PATTERN)]
Ts = Annotated[float, Meta(ge=TS_MIN, le=TS_MAX)]
Counter = Annotated[int, Meta(ge=0, le=COUNTER_MAX)]
ShortText = Annotated[str, Meta(max_length=64)]

REJECT_REASONS: Final = (
    "too_large",
    "not_utf8",
    "bad_json",
    "too_deep",
    "not_object",
    "missing_field",
    "bad_type",
    "out_of_range",
    "bad_topic",
    "bad_id",
    "tid_mismatch",
    "card_data",
    "counter_backwards",
)


class DecodeError(ValueError):
    """A message was rejected; `reason` is one of REJECT_REASONS, `detail` is safe to log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Net(Struct, frozen=True):
    """Network health reported by the terminal."""

    type: Literal["wifi", "ethernet", "cellular"] | None = None
    rssi_dbm: Annotated[float, Meta(ge=-200, le=50)] | None = None


class Power(Struct, frozen=True):
    """Power supply reported by the terminal."""

    source: Literal["mains", "battery"] | None = None
    battery_pct: Annotated[float, Meta(ge=0, le=100)] | None = None


class Hardware(Struct, frozen=True):
    """Peripheral health reported by the terminal."""

    printer: Literal["ok", "paper_out", "fault"] | None = None
    display: Literal["ok", "fault"] | None = None
    card_reader: Literal["ok", "fault"] | None = None


class Heartbeat(Struct, frozen=True):
    """`pos/v1/{tid}/heartbeat`."""

    tid: Id
    ts: Ts
    seq: Counter
    interval_s: Annotated[float, Meta(gt=0, le=86_400)]
    txn_count: Counter
    uploaded_count: Counter
    queue_depth: Counter
    oldest_queued_ts: Ts | None
    mid: Id | None = None
    model: ShortText | None = None
    app_version: ShortText | None = None
    os_version: ShortText | None = None
    uptime_s: Annotated[float, Meta(ge=0, le=COUNTER_MAX)] | None = None
    net: Net | None = None
    power: Power | None = None
    hw: Hardware | None = None


class Status(Struct, frozen=True):
    """`pos/v1/{tid}/status` (retained; also the terminal's last will)."""

    state: Literal["online", "offline"]
    ts: Ts | None = None
    reason: ShortText | None = None
    tid: str = ""  # filled from the topic


class UpstreamTxn(Struct, frozen=True):
    """One transaction the acquirer's host recorded."""

    tid: Id
    txn_id: Annotated[str, Meta(min_length=1, max_length=64)]
    ts: Ts


class UpstreamBatch(Struct, frozen=True):
    """`acquirer/v1/{acquirer_id}/transactions` or the same body POSTed to the API."""

    ts: Ts
    txns: Annotated[list[UpstreamTxn], Meta(max_length=10_000)]
    acquirer: str = ""  # filled from the topic or URL


class TxnReceipt(Struct, frozen=True):
    """`pos/v1/{tid}/txn`: a transaction the terminal completed (never card data)."""

    txn_id: Annotated[str, Meta(min_length=1, max_length=64)]
    ts: Ts
    amount_minor: Counter
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
    status: Literal["approved", "declined", "reversed", "pending"]
    tid: str = ""


Message = Heartbeat | Status | UpstreamBatch | TxnReceipt

_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "heartbeat": msgspec.json.Decoder(Heartbeat),
    "status": msgspec.json.Decoder(Status),
    "txn": msgspec.json.Decoder(TxnReceipt),
}
_UPSTREAM_DECODER: Final = msgspec.json.Decoder(UpstreamBatch)

# 13–19 digits, optionally grouped by single spaces or dashes, not part of a longer digit run. The cheap
# prefilter (a 13+ character run of digits, spaces and dashes) rejects ordinary payloads in ~2 µs.
_PAN_PREFILTER: Final = re.compile(rb"[0-9][0-9 -]{11,}[0-9]")
_PAN_CANDIDATE: Final = re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_MAX_NESTING: Final = 16


def luhn_ok(digits: bytes) -> bool:
    """True when the ASCII digit string passes the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ch - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def find_card_number(payload: bytes) -> bool:
    """True when the payload holds anything that looks like a card number (Luhn-valid 13–19 digits)."""
    for run in _PAN_PREFILTER.finditer(payload):
        for m in _PAN_CANDIDATE.finditer(run.group()):
            digits = m.group().replace(b" ", b"").replace(b"-", b"")
            if 13 <= len(digits) <= 19 and luhn_ok(digits):
                return True
    return False


def _nesting_too_deep(payload: bytes) -> bool:
    # Cheap upper bound: brackets inside strings count too, which only errs towards rejecting absurd payloads.
    if payload.count(b"{") + payload.count(b"[") <= _MAX_NESTING:
        return False  # cannot be deeper than the number of openers (the common case, in C)
    depth = 0
    for ch in payload:
        if ch in (0x5B, 0x7B):
            depth += 1
            if depth > _MAX_NESTING:
                return True
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return False


def _classify(err: msgspec.ValidationError | msgspec.DecodeError) -> DecodeError:
    text = str(err)
    # msgspec's messages name the path (`- at `$.net.rssi_dbm``) but never echo numbers; enum and regex
    # messages do echo the offending string, so only the path is kept as detail.
    where = text.rsplit(" - at ", 1)[-1].strip("`") if " - at " in text else ""
    if isinstance(err, msgspec.ValidationError):
        if text.startswith("Object missing required field"):
            return DecodeError("missing_field", text.split("`")[1] if "`" in text else "")
        if "matching regex" in text:
            return DecodeError("bad_id", where)
        if ", got `" in text:
            return DecodeError("not_object" if not where else "bad_type", where)
        if text.startswith("Invalid enum value"):
            return DecodeError("bad_type", where)
        return DecodeError("out_of_range", where)
    if "invalid utf-8" in text.lower():
        return DecodeError("not_utf8")
    return DecodeError("bad_json")


MAX_UPSTREAM_BYTES: Final = 1_048_576  # a feed batch may hold many transactions; still bounded


def _check_id(value: str, what: str) -> None:
    if not _ID_RE.match(value):
        raise DecodeError("bad_id", what)
    if find_card_number(value.encode()):  # an id must never carry a card number into state, labels or logs
        raise DecodeError("card_data", what)


def _check_payload(payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
    if len(payload) > max_bytes:
        raise DecodeError("too_large", f"{len(payload)} bytes")
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("not_utf8") from None
    if _nesting_too_deep(payload):
        raise DecodeError("too_deep")
    if find_card_number(payload):
        raise DecodeError("card_data")


def decode_upstream(acquirer: str, payload: bytes) -> UpstreamBatch:
    """Decode an acquirer feed body (MQTT or HTTP); the acquirer id comes from the topic or URL."""
    _check_id(acquirer, "acquirer")
    _check_payload(payload, MAX_UPSTREAM_BYTES)
    try:
        batch = _UPSTREAM_DECODER.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise _classify(err) from None
    return msgspec.structs.replace(batch, acquirer=acquirer)


def decode(topic: str, payload: bytes, prefix: str = "pos/v1", upstream_prefix: str = "acquirer/v1") -> Message:
    """Decode one MQTT message into a typed message or raise DecodeError."""
    if topic.startswith(upstream_prefix + "/"):
        rest = topic[len(upstream_prefix) + 1 :].split("/")
        if len(rest) != 2 or rest[1] != "transactions":
            raise DecodeError("bad_topic")
        return decode_upstream(rest[0], payload)
    if not topic.startswith(prefix + "/"):
        raise DecodeError("bad_topic")
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) != 2 or parts[1] not in _DECODERS:
        raise DecodeError("bad_topic")
    tid, kind = parts
    _check_id(tid, "topic")
    _check_payload(payload)
    try:
        msg: Heartbeat | Status | TxnReceipt = _DECODERS[kind].decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise _classify(err) from None
    if isinstance(msg, Heartbeat):
        if msg.tid != tid:
            raise DecodeError("tid_mismatch")
        if not math.isfinite(msg.ts):
            raise DecodeError("out_of_range", "ts")
        if msg.queue_depth > msg.txn_count:
            raise DecodeError("out_of_range", "queue_depth exceeds txn_count")
        return msg
    return msgspec.structs.replace(msg, tid=tid)


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the v1 payloads, generated from the same types the collector decodes with."""
    return {
        "heartbeat": msgspec.json.schema(Heartbeat),
        "status": msgspec.json.schema(Status),
        "txn": msgspec.json.schema(TxnReceipt),
        "upstream": msgspec.json.schema(UpstreamBatch),
    }
