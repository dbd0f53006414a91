"""The card-data guard: does a payload hold a card number (PAN)? It must never be stored or logged.

The guard reads what a payload *means*, not its bytes: every decoded string (keys too) and every 13–19 digit
integer is searched for a card number, after JSON escapes are resolved and Unicode digits mapped to their value;
floats are never searched (the fractional digits of `8.285714285714285` are not a number). A number is card data
only when it passes Luhn *and* has the issuer prefix and length of a real card brand (`CARD_BRANDS`), which keeps
millisecond timestamps and snowflake ids from being mistaken for PANs.
"""

from __future__ import annotations

import re
import unicodedata
from itertools import accumulate
from typing import Final

import msgspec

__all__ = [
    "CARD_BRANDS",
    "PAN_MAX_DIGITS",
    "PAN_MIN_DIGITS",
    "card_data_in",
    "find_card_number",
    "has_card_number",
    "is_card_number",
    "json_has_card",
    "luhn_ok",
    "may_hold_card",
    "text_has_card",
]

# ---- the card-data guard -----------------------------------------------------------------------------------

# Issuer prefixes and lengths of the card brands in use: (brand, lowest prefix, highest prefix, lengths).
# Source: ISO/IEC 7812 IIN ranges as tabulated in Wikipedia, "Payment card number" § Issuer identification
# number (https://en.wikipedia.org/wiki/Payment_card_number), read 2025. Ranges overlap (Maestro 56–69 covers
# most of 6); a number matching any row is plausible. Nothing starts with 0, 7 or 9, and 1 only as 15-digit
# UATP: 13-digit millisecond timestamps and 19-digit snowflake ids (both start with 1) never match.
CARD_BRANDS: Final[tuple[tuple[str, str, str, tuple[int, ...]], ...]] = (
    ("visa", "4", "4", (13, 16, 19)),
    ("mastercard", "51", "55", (16,)),
    ("mastercard", "2221", "2720", (16,)),
    ("amex", "34", "34", (15,)),
    ("amex", "37", "37", (15,)),
    ("discover", "6011", "6011", (16, 17, 18, 19)),
    ("discover", "644", "649", (16, 17, 18, 19)),
    ("discover", "65", "65", (16, 17, 18, 19)),
    ("jcb", "3528", "3589", (16, 17, 18, 19)),
    ("unionpay", "62", "62", (16, 17, 18, 19)),
    ("diners", "36", "36", (14, 15, 16, 17, 18, 19)),
    ("diners", "300", "305", (14, 15, 16, 17, 18, 19)),
    ("diners", "38", "39", (14, 15, 16, 17, 18, 19)),
    ("maestro", "50", "50", (13, 14, 15, 16, 17, 18, 19)),
    ("maestro", "56", "69", (13, 14, 15, 16, 17, 18, 19)),
    ("mir", "2200", "2204", (16, 17, 18, 19)),
    ("rupay", "60", "60", (16,)),
    ("rupay", "65", "65", (16,)),
    ("rupay", "81", "82", (16,)),
    ("rupay", "508", "508", (16,)),
    ("uatp", "1", "1", (15,)),
)
# The table as a lookup: for each length, the set of 4-digit beginnings a card number of that length can have.
_PREFIX4_BY_LENGTH: Final[dict[int, frozenset[str]]] = {
    n: frozenset(
        f"{p:04d}"
        for _b, lo, hi, lengths in CARD_BRANDS if n in lengths
        for p in range(int(lo.ljust(4, "0")), int(hi.ljust(4, "9")) + 1)
    )
    for n in range(13, 20)
}
PAN_MIN_DIGITS: Final = 13
PAN_MAX_DIGITS: Final = 19
# Digits may be grouped by a short run (1–3) of anything that is not a letter or digit: "4111 1111", "4111 - 1111",
# "4111.1111", "4111_1111", "4111\t1111". A group is a maximal run of such digit chunks with at least 13 digits.
_GROUP_RE: Final = re.compile(r"\d(?:[\W_]{0,3}\d){12,}")
_CHUNK_RE: Final = re.compile(r"\d+")
# Prefilter on raw bytes, so ordinary heartbeats skip the slow path (a generic decode and a walk). Without a
# backslash (JSON escape) or a non-ASCII byte every decoded string is its raw bytes and every quote delimits a
# string, so quote parity tells whether a run of digits and punctuation lies inside a string or between values.
# Inside a string, a group shows as 13 digits with ≤3 non-alphanumerics between them; between values only an
# integer of 13+ digits can hold a card number — never the fraction of a float (`8.285714285714285`).
_RAW_RUN: Final = re.compile(rb'[0-9][^A-Za-z"]{11,}[0-9]')  # one character class: fast in `re`
_RAW_GROUP: Final = re.compile(rb'[0-9](?:[^A-Za-z0-9"]{0,3}[0-9]){12}')
_RAW_INTEGER: Final = re.compile(rb"(?<![.0-9])[0-9]{13}")
_INT_LOW: Final = 10 ** (PAN_MIN_DIGITS - 1)
_INT_HIGH: Final = 10**PAN_MAX_DIGITS
_DOUBLED: Final = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: 2·d with its digits summed
# The same, keyed the other way: the lengths a card number beginning with these 4 digits can have.
_LENGTHS_BY_HEAD: Final[dict[str, tuple[int, ...]]] = {
    head: tuple(n for n in range(13, 20) if head in _PREFIX4_BY_LENGTH[n])
    for head in set().union(*_PREFIX4_BY_LENGTH.values())
}


def luhn_ok(digits: str) -> bool:
    """True when the ASCII digit string passes the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _DOUBLED[d] if i % 2 else d
    return total % 10 == 0


def is_card_number(digits: str) -> bool:
    """True when an ASCII digit string has a card brand's prefix and length and passes Luhn."""
    return digits[:4] in _PREFIX4_BY_LENGTH.get(len(digits), frozenset()) and luhn_ok(digits)


def _ascii(chunk: str) -> str:
    # Full-width, Arabic-Indic, Devanagari… decimal digits (Unicode Nd, what `\d` matches) to 0–9.
    return chunk if chunk.isascii() else "".join(str(unicodedata.decimal(c)) for c in chunk)


def _luhn_sums(digits: str) -> tuple[list[int], list[int]]:
    # Prefix sums of Luhn weights for both parities: the Luhn sum of any span is then one subtraction, so a
    # hostile string of thousands of one-digit chunks costs a few operations per span, not a loop per span.
    values = [ord(c) - 48 for c in digits]
    odd_doubled = [v if p % 2 == 0 else _DOUBLED[v] for p, v in enumerate(values)]
    even_doubled = [_DOUBLED[v] if p % 2 == 0 else v for p, v in enumerate(values)]
    return list(accumulate(odd_doubled, initial=0)), list(accumulate(even_doubled, initial=0))


def _group_has_card(chunks: list[str]) -> bool:
    """Any span of whole chunks that is a card number (each chunk ASCII digits)."""
    digits = "".join(chunks)
    boundary = bytearray(len(digits) + 1)
    starts = []
    pos = 0
    for chunk in chunks:
        starts.append(pos)
        boundary[pos] = 1
        pos += len(chunk)
    boundary[pos] = 1
    sums: tuple[list[int], list[int]] | None = None
    for a in starts:
        for n in _LENGTHS_BY_HEAD.get(digits[a : a + 4], ()):  # most starts are ruled out by one lookup
            b = a + n
            if b > len(digits):
                break
            if not boundary[b]:
                continue
            if sums is None:
                sums = _luhn_sums(digits)
            # The rightmost digit (b-1) is never doubled: pick the sums that double the other parity.
            weights = sums[0] if (b - 1) % 2 == 0 else sums[1]
            if (weights[b] - weights[a]) % 10 == 0:
                return True
    return False


def has_card_number(text: str) -> bool:
    """True when a decoded string holds a card number, in any digits and with any short separators."""
    # Every contiguous span of whole chunks totalling 13–19 digits: a PAN written "exp 12 25 4111 1111 …" or
    # glued to a date is still found, and a chunk is never cut (20 unbroken digits are not a PAN).
    for match in _GROUP_RE.finditer(text):
        group = match.group()
        chunks = _CHUNK_RE.findall(group)
        if _group_has_card(chunks if group.isascii() else [_ascii(c) for c in chunks]):
            return True
    return False


def card_data_in(value: object) -> bool:
    """True when any string (key or value) or 13–19 digit integer in a decoded JSON value holds a card number."""
    stack = [value]
    while stack:
        v = stack.pop()
        # Exact types (a generic msgspec decode builds nothing else; bool is not an int here), most common first.
        if type(v) is str:
            if len(v) >= PAN_MIN_DIGITS and has_card_number(v):  # most keys and values are short
                return True
        elif type(v) is dict:
            stack.extend(v)
            stack.extend(v.values())
        elif type(v) is list:
            stack.extend(v)
        elif type(v) is int and _INT_LOW <= abs(v) < _INT_HIGH and is_card_number(str(abs(v))):
            return True  # a counter that large is implausible anyway; floats are never searched
    return False


def may_hold_card(payload: bytes) -> bool:
    """Cheap prefilter on the raw bytes: False only when the payload certainly holds no card number."""
    if b"\\" in payload or not payload.isascii():
        return True  # JSON escapes or Unicode digits: only the decoded strings tell
    quotes, counted_to = 0, 0  # quotes before the current run, counted incrementally: linear in the payload
    for run in _RAW_RUN.finditer(payload):
        quotes += payload.count(b'"', counted_to, run.start())
        counted_to = run.start()
        if (_RAW_GROUP if quotes % 2 else _RAW_INTEGER).search(run.group()):
            return True
    return False


def text_has_card(payload: bytes) -> bool:
    """Search a payload that is not JSON as one string."""
    # A payload that is not JSON is rejected anyway; searching its text keeps a PAN in it counted as card data.
    return has_card_number(payload.decode("utf-8", "replace"))


def json_has_card(payload: bytes) -> bool:
    """find_card_number with the raw-bytes prefilter first: exact for well-formed JSON, the hot path."""
    if not may_hold_card(payload):
        return False
    try:
        value = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return text_has_card(payload)
    return card_data_in(value)


def find_card_number(payload: bytes) -> bool:
    """True when a JSON payload holds a card number anywhere; text that is not JSON is searched as one string."""
    try:
        value = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return text_has_card(payload)
    return card_data_in(value)
