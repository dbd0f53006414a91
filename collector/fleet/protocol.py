"""Protocol v1: typed messages and `decode(topic, payload, received_at)`, a pure function.

Every rejection raises `DecodeError` with one reason out of `REJECT_REASONS`; the raw payload never appears in
the error (it may hold card data or garbage), only the reason and a short, safe detail.

Every payload passes the card-data guard (collector/fleet/carddata.py) before it is used: a message that appears
to hold a card number is rejected with reason `card_data` and never stored or logged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Container
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from collector.fleet.carddata import (
    CARD_BRANDS,
    PAN_MIN_DIGITS,
    card_data_in,
    find_card_number,
    has_card_number,
    is_card_number,
    json_has_card,
    luhn_ok,
    may_hold_card,
    text_has_card,
)

__all__ = [
    "CARD_BRANDS",
    "REJECT_REASONS",
    "DecodeError",
    "Heartbeat",
    "Message",
    "Status",
    "TxnReceipt",
    "UpstreamBatch",
    "UpstreamBody",
    "UpstreamTxn",
    "card_data_in",
    "check_id",
    "decode",
    "decode_upstream",
    "find_card_number",
    "has_card_number",
    "is_card_number",
    "luhn_ok",
    "valid_id",
]

MAX_PAYLOAD_BYTES: Final = 4096
MAX_UPSTREAM_BYTES: Final = 1_048_576  # a feed batch may hold many transactions; still bounded
MAX_UPSTREAM_TXNS: Final = 10_000
# A full match: Python's `$` also matches before a trailing newline, and a newline in an id breaks /metrics.
# `(?!\n)$` means the same in Python and ECMA-262, so the pattern exported into the JSON Schema stays valid.
ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}(?!\n)$"
_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Terminal clocks: any finite time is *decoded* — a clock reset to 1970 or decades ahead belongs to a real,
# working terminal, which state reports as `clock_skew`. 2**53 is where a float stops holding whole seconds.
TS_MAX: Final = float(2**53)
# Times that are rendered as dates (receipts, the acquirer's records) stay in 2000–2100: the acquirer's host
# keeps NTP time, so outside that range is a unit error (milliseconds), rejected rather than misread.
DATE_TS_MIN: Final = 946_684_800.0
DATE_TS_MAX: Final = 4_102_444_800.0
COUNTER_MAX: Final = 2**53  # JSON numbers above this lose precision in most firmware languages.

Id = Annotated[str, Meta(pattern=ID_PATTERN)]
Ts = Annotated[float, Meta(ge=0, le=TS_MAX)]
DateTs = Annotated[float, Meta(ge=DATE_TS_MIN, le=DATE_TS_MAX)]
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
    """A message was rejected; `reason` is one of REJECT_REASONS, `detail` is safe to log.

    `tid`/`acquirer` name the sender when the topic carried a valid id (never one holding card data), so the
    collector can tell that sender apart from silence.
    """

    def __init__(self, reason: str, detail: str = "", *, tid: str | None = None,
                 acquirer: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.tid = tid
        self.acquirer = acquirer


def valid_id(s: str) -> bool:
    """True when s is a whole terminal/merchant/acquirer id: [A-Za-z0-9_-]{1,64}, nothing before or after."""
    return _ID_RE.fullmatch(s) is not None


# ---- messages ----------------------------------------------------------------------------------------------


class Net(Struct, frozen=True, gc=False):
    """Network health reported by the terminal."""

    type: Literal["wifi", "ethernet", "cellular"] | None = None
    rssi_dbm: Annotated[float, Meta(ge=-200, le=50)] | None = None


class Power(Struct, frozen=True, gc=False):
    """Power supply reported by the terminal."""

    source: Literal["mains", "battery"] | None = None
    battery_pct: Annotated[float, Meta(ge=0, le=100)] | None = None


class Hardware(Struct, frozen=True, gc=False):
    """Peripheral health reported by the terminal."""

    printer: Literal["ok", "paper_out", "fault"] | None = None
    display: Literal["ok", "fault"] | None = None
    card_reader: Literal["ok", "fault"] | None = None


# The heartbeat's structs hold scalars and each other only (no cycles): gc=False keeps them out of the GC.
class Heartbeat(Struct, frozen=True, gc=False):
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
    ts: DateTs


class UpstreamBody(Struct, frozen=True):
    """`acquirer/v1/{acquirer_id}/transactions` or the same body POSTed to the API (what the acquirer sends)."""

    ts: DateTs
    txns: Annotated[list[UpstreamTxn], Meta(max_length=MAX_UPSTREAM_TXNS)]


class UpstreamBatch(Struct, frozen=True):
    """A decoded feed body: the transactions kept, the acquirer from the topic or URL, one reason per drop."""

    ts: DateTs
    txns: list[UpstreamTxn]
    acquirer: str = ""  # filled from the topic or URL
    dropped: tuple[str, ...] = ()  # one REJECT_REASONS entry per transaction left out


class _Envelope(Struct, frozen=True):
    # Each transaction stays raw so one bad transaction drops only itself.
    ts: DateTs
    txns: Annotated[list[msgspec.Raw], Meta(max_length=MAX_UPSTREAM_TXNS)]


class TxnReceipt(Struct, frozen=True):
    """`pos/v1/{tid}/txn`: a transaction the terminal completed (never card data)."""

    txn_id: Annotated[str, Meta(min_length=1, max_length=64)]
    ts: DateTs
    amount_minor: Counter
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}(?!\n)$")]
    status: Literal["approved", "declined", "reversed", "pending"]
    tid: str = ""


Message = Heartbeat | Status | UpstreamBatch | TxnReceipt

_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "heartbeat": msgspec.json.Decoder(Heartbeat),
    "status": msgspec.json.Decoder(Status),
    "txn": msgspec.json.Decoder(TxnReceipt),
}
_BODY_DECODER: Final = msgspec.json.Decoder(UpstreamBody)
_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
_TXN_DECODER: Final = msgspec.json.Decoder(UpstreamTxn)
_MAX_NESTING: Final = 16


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


def check_id(value: str, what: str) -> None:
    """Raise DecodeError (`bad_id`, or `card_data` for an id holding a card number) unless value is a safe id."""
    if not valid_id(value):
        raise DecodeError("bad_id", what)
    if has_card_number(value):  # an id must never carry a card number into state, labels or logs
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


def _decode_txns(raws: list[msgspec.Raw], holds_card: list[bool]) -> tuple[list[UpstreamTxn], tuple[str, ...]]:
    kept: list[UpstreamTxn] = []
    dropped: list[str] = []
    for raw, card in zip(raws, holds_card, strict=True):
        if card:
            dropped.append("card_data")
            continue
        try:
            kept.append(_TXN_DECODER.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            dropped.append(_classify(err).reason)
    return kept, tuple(dropped)


def _decode_upstream_body(payload: bytes) -> tuple[float, list[UpstreamTxn], tuple[str, ...]]:
    _check_payload(payload, MAX_UPSTREAM_BYTES)
    suspect = may_hold_card(payload)
    if not suspect:
        try:  # the common case: nothing to search and every transaction valid, in one pass in C
            body = _BODY_DECODER.decode(payload)
            return body.ts, body.txns, ()
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass  # a bad envelope or some bad transactions: told apart below
    try:
        envelope = _ENVELOPE_DECODER.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        if find_card_number(payload):  # e.g. a PAN where `ts` or `txns` should be, or in broken JSON
            raise DecodeError("card_data") from None
        raise _classify(err) from None
    holds_card = [False] * len(envelope.txns)
    if suspect:
        doc = msgspec.json.decode(payload)
        # Card data outside the transactions (the envelope's own fields) rejects the whole body.
        if card_data_in({k: v for k, v in doc.items() if k != "txns"}):
            raise DecodeError("card_data")
        holds_card = [card_data_in(txn) for txn in doc["txns"]]
        if len(holds_card) != len(envelope.txns):  # both decoders keep the last of duplicate keys; never trust it
            raise DecodeError("bad_json", "txns")
        if not any(holds_card):
            try:  # numeric txn ids made the prefilter look closer, but nothing is card data
                return envelope.ts, _BODY_DECODER.decode(payload).txns, ()
            except msgspec.ValidationError:
                pass
    kept, dropped = _decode_txns(envelope.txns, holds_card)
    return envelope.ts, kept, dropped


def decode_upstream(acquirer: str, payload: bytes) -> UpstreamBatch:
    """Decode an acquirer feed body (MQTT or HTTP); a bad transaction is dropped, a bad envelope raises."""
    check_id(acquirer, "acquirer")
    try:
        ts, txns, dropped = _decode_upstream_body(payload)
    except DecodeError as err:
        err.acquirer = acquirer
        raise
    return UpstreamBatch(ts=ts, txns=txns, acquirer=acquirer, dropped=dropped)


_HB_FIELDS: Final = Heartbeat.__struct_fields__
_NULL_OF: Final = {name: b'"%s":null' % name.encode() for cls in (Heartbeat, Net, Power, Hardware)
                   for name in cls.__struct_fields__}
_INT_LOW: Final = 10 ** (PAN_MIN_DIGITS - 1)  # the smallest number of 13 digits


def _heartbeat_holds_no_card(hb: Heartbeat, tid: str, payload: bytes) -> bool:
    """True when the payload of `hb` certainly holds no card number: the card-data guard's answer for the common
    heartbeat, read from the typed message instead of a scan of the raw bytes (`json_has_card`, ~5 µs). False
    means "ask the guard", never "card data".

    The typed message shows only the fields it kept; the rest of the payload is accounted for by counting. With
    no backslash and no non-ASCII byte, every key is followed by a colon outside any string, and every null value
    written as `"key":null` is counted by `":null`. So the colons are at least the keys, and the keys at least
    the non-None fields plus those nulls. When the colons are exactly that many and every such null is one of a
    field the message left None, every key is a field of the message and every other value is a value the
    message kept: no unknown key, no overwritten duplicate, no colon in a string, nothing else to search.
    """
    if b"\\" in payload or not payload.isascii() or hb.tid != tid:  # the topic's id passed check_id
        return False
    values = msgspec.structs.astuple(hb)
    present = len(values) - values.count(None)
    for sub in (hb.net, hb.power, hb.hw):
        if sub is not None:
            sub_values = msgspec.structs.astuple(sub)
            present += len(sub_values) - sub_values.count(None)
    nulls = payload.count(b'":null')
    if payload.count(b":") != present + nulls or (nulls and not _nulls_left_none(hb, payload, nulls)):
        return False
    if max(hb.seq, hb.txn_count, hb.uploaded_count, hb.queue_depth, hb.ts, hb.oldest_queued_ts or 0.0,
           hb.uptime_s or 0.0) >= _INT_LOW:
        return False  # 13+ digits: the guard reads them (a float field may hold a JSON integer; bounded ones can't)
    for text in (hb.mid, hb.model, hb.app_version, hb.os_version):
        if text is not None and len(text) >= PAN_MIN_DIGITS and has_card_number(text):
            return False
    return True


def _nulls_left_none(hb: Heartbeat, payload: bytes, nulls: int) -> bool:
    """True when each of the payload's `nulls` null values is written as `"field":null` of a field the heartbeat
    left None (a key of its own, with a null value, could still be a card number)."""
    if hb.oldest_queued_ts is None:  # the usual null: a heartbeat with an empty upload queue
        nulls -= payload.count(b'"oldest_queued_ts":null')
        if nulls <= 0:
            return nulls == 0
    for struct in (hb, hb.net, hb.power, hb.hw):
        if struct is None:
            continue
        for name, value in zip(struct.__struct_fields__, msgspec.structs.astuple(struct), strict=True):
            if value is None and name != "oldest_queued_ts":
                nulls -= payload.count(_NULL_OF[name])
                if nulls <= 0:
                    return nulls == 0
    return False


def _decode_terminal(tid: str, kind: str, payload: bytes) -> Heartbeat | Status | TxnReceipt:
    _check_payload(payload)
    msg: Heartbeat | Status | TxnReceipt | None = None
    if kind == "heartbeat":
        try:  # the common case in one pass in C, then the guard read from the typed heartbeat
            msg = _DECODERS[kind].decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass  # told apart below, after the guard
        else:
            assert isinstance(msg, Heartbeat)
            if _heartbeat_holds_no_card(msg, tid, payload):
                return _checked_heartbeat(msg, tid)
    if json_has_card(payload):
        raise DecodeError("card_data")
    try:
        if msg is None:
            msg = _DECODERS[kind].decode(payload)
    except msgspec.ValidationError as err:
        raise _classify(err) from None
    except msgspec.DecodeError as err:  # not JSON: the prefilter's quote parity meant nothing
        raise DecodeError("card_data") if text_has_card(payload) else _classify(err) from None
    if isinstance(msg, Heartbeat):
        return _checked_heartbeat(msg, tid)
    return msgspec.structs.replace(msg, tid=tid)


def _checked_heartbeat(msg: Heartbeat, tid: str) -> Heartbeat:
    """What the schema cannot say about a heartbeat: its id is the topic's, its time finite, its queue bounded."""
    if msg.tid != tid:
        raise DecodeError("tid_mismatch")
    if not math.isfinite(msg.ts):
        raise DecodeError("out_of_range", "ts")
    if msg.queue_depth > msg.txn_count:
        raise DecodeError("out_of_range", "queue_depth exceeds txn_count")
    return msg


def decode(
    topic: str, payload: bytes, prefix: str = "pos/v1", upstream_prefix: str = "acquirer/v1",
    checked_ids: Container[str] = (),
) -> Message:
    """Decode one MQTT message into a typed message or raise DecodeError.

    `checked_ids` are terminal ids known to pass `check_id` (the fleet's terminals: registry ids are checked when
    the registry is loaded, others when first heard): a topic naming one skips the check (~1 µs per message).
    """
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
    if tid not in checked_ids:
        check_id(tid, "topic")
    try:
        return _decode_terminal(tid, kind, payload)
    except DecodeError as err:
        err.tid = tid  # a valid id without card data (checked above): safe to name the sender
        raise


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of the v1 payloads, generated from the same types the collector decodes with."""
    return {
        "heartbeat": msgspec.json.schema(Heartbeat),
        "status": msgspec.json.schema(Status),
        "txn": msgspec.json.schema(TxnReceipt),
        "upstream": msgspec.json.schema(UpstreamBody),
    }
