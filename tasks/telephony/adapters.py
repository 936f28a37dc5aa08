"""Adapters: Twilio status callbacks and Asterisk CDRs translated into ``crm.call/1`` messages.

Pure functions, no database and no network: a provider's fields in, a ``crm.call/1`` dict out.
The result goes through ``crm.ingest.call`` like any other call update (validated there with the
call schema), so every format gets the same merging, matching and follow-ups.
"""

from __future__ import annotations

import csv
import email.utils
import functools
import hashlib
import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers

SCHEMA = "crm.call/1"


class AdapterError(ValueError):
    """The provider's data cannot be a call update (no call id, a malformed time, …)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- Twilio -------------------------------------------------------------------------------------

#: Twilio ``CallStatus`` → our status. ``canceled`` (the caller hung up while it rang) and
#: ``no-answer`` are both a call nobody answered.
TWILIO_STATUSES = {
    "queued": "ringing",
    "initiated": "ringing",
    "ringing": "ringing",
    "in-progress": "answered",
    "completed": "completed",
    "busy": "busy",
    "failed": "failed",
    "no-answer": "missed",
    "canceled": "missed",
}
#: Statuses of a child leg that say only that this one leg was not answered (another leg of the
#: same call may have been): kept raw, so they never mark the whole call missed.
TWILIO_UNANSWERED_LEG = {"busy", "failed", "no-answer", "canceled"}
TWILIO_DIRECTIONS = {"inbound": "inbound", "outbound-api": "outbound", "outbound-dial": "outbound"}
#: Which time a callback's ``Timestamp`` is, by our status.
TIME_OF_STATUS = {
    "ringing": "started_at",
    "answered": "answered_at",
    "completed": "ended_at",
    "missed": "ended_at",
    "busy": "ended_at",
    "failed": "ended_at",
}


def twilio_to_call(
    params: Mapping[str, str] | Iterable[tuple[str, str]], *, source_system: str = "twilio"
) -> dict[str, Any]:
    """One Twilio call status callback (its form fields) as a ``crm.call/1`` update.

    A child leg (``ParentCallSid``, e.g. the ``<Dial>`` to an agent) merges into its parent call:
    it gives its status, times, duration and the party it rang (as the agent), while the numbers
    and direction of the call stay those of the parent. Its ``SequenceNumber`` counts that leg's
    own callbacks, so it is not used to order it against the parent's.
    """
    fields = _single_values(params)
    call_sid = fields.get("CallSid", "").strip()
    if not call_sid:
        raise AdapterError("a Twilio status callback needs CallSid")
    parent = fields.get("ParentCallSid", "").strip()
    raw_status = fields.get("CallStatus", "").strip().lower()
    status: str | None = TWILIO_STATUSES.get(raw_status, raw_status or None)
    message: dict[str, Any] = {
        "schema": SCHEMA,
        "source_system": source_system,
        "call_id": parent or call_sid,
    }
    from_raw, to_raw = fields.get("From", "").strip(), fields.get("To", "").strip()
    if parent:
        if raw_status in TWILIO_UNANSWERED_LEG:
            status = f"leg {raw_status}"
        message["agent"] = _identity(to_raw) or to_raw or None
    else:
        message["direction"] = TWILIO_DIRECTIONS.get(fields.get("Direction", "").strip().lower())
        message["from"] = _identity(from_raw) or from_raw or None
        message["to"] = _identity(to_raw) or to_raw or None
        # A browser or SIP client on our side is the staff member who handled the call.
        agent = _identity(to_raw) if message["direction"] == "inbound" else _identity(from_raw)
        if agent:
            message["agent"] = agent
        if (sequence := _non_negative_int(fields.get("SequenceNumber"))) is not None:
            message["sequence"] = sequence
    message["status"] = status
    if status in TIME_OF_STATUS and (moment := _rfc2822(fields.get("Timestamp"))):
        message[TIME_OF_STATUS[status]] = moment
    if status == "completed" and (duration := _non_negative_int(fields.get("CallDuration"))):
        message["duration_s"] = duration
    recording = fields.get("RecordingUrl", "").strip()
    if recording.lower().startswith(("http://", "https://")):
        message["recording"] = {"url": recording}
    return {k: v for k, v in message.items() if v is not None}


def _single_values(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Form fields as a dict; of a field sent twice the first value counts."""
    pairs = params.items() if isinstance(params, Mapping) else params
    fields: dict[str, str] = {}
    for key, value in pairs:
        fields.setdefault(str(key), str(value))
    return fields


def _identity(value: str) -> str | None:
    """``client:anna`` → ``anna``, ``sip:201@pbx.example.fi`` → ``201``; None for a number."""
    lowered = value.lower()
    if lowered.startswith("client:"):
        return value[len("client:") :] or None
    if lowered.startswith(("sip:", "sips:")):
        user = value.split(":", 1)[1].split("@", 1)[0].split(";", 1)[0]
        return user or None
    return None


def _non_negative_int(value: str | None) -> int | None:
    """ASCII digits only: ``str.isdigit`` also takes ``²`` (which ``int`` refuses) and other
    scripts' digits (which it reads)."""
    text = (value or "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def _rfc2822(value: str | None) -> str | None:
    """Twilio's ``Timestamp`` (RFC 2822, ``Wed, 25 Nov 2026 08:30:01 +0000``) as ISO 8601."""
    # ASCII only, as every number we read: the parser's int() would take other scripts' digits.
    if not value or not value.isascii():
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # RFC 2822's "-0000": UTC with no claim about local time
        return moment.isoformat() + "+00:00"
    return moment.isoformat()


# -- Asterisk -----------------------------------------------------------------------------------

#: The columns of Asterisk's Master.csv (cdr_csv) in file order. ``uniqueid`` and ``userfield``
#: are written with ``loguniqueid``/``loguserfield``; the last three with ``newcdrcolumns``.
CDR_BASE_COLUMNS = (
    "accountcode",
    "src",
    "dst",
    "dcontext",
    "clid",
    "channel",
    "dstchannel",
    "lastapp",
    "lastdata",
    "start",
    "answer",
    "end",
    "duration",
    "billsec",
    "disposition",
    "amaflags",
)
#: Column layouts of a Master.csv without a header row, by the number of fields.
CDR_LAYOUTS: dict[int, tuple[str, ...]] = {
    16: CDR_BASE_COLUMNS,
    17: (*CDR_BASE_COLUMNS, "uniqueid"),
    18: (*CDR_BASE_COLUMNS, "uniqueid", "userfield"),
    19: (*CDR_BASE_COLUMNS, "peeraccount", "linkedid", "sequence"),
    20: (*CDR_BASE_COLUMNS, "uniqueid", "peeraccount", "linkedid", "sequence"),
    21: (*CDR_BASE_COLUMNS, "uniqueid", "userfield", "peeraccount", "linkedid", "sequence"),
}
#: Asterisk's dispositions → our statuses. A CDR is written when the call has ended.
DISPOSITIONS = {
    "ANSWERED": "completed",
    "NO ANSWER": "missed",
    "BUSY": "busy",
    "FAILED": "failed",
    "CONGESTION": "failed",
}
#: Dialplan contexts that say which way a call went (FreePBX and common hand-written names).
INBOUND_CONTEXT = re.compile(r"pstn|trunk|did|incoming|inbound|external", re.IGNORECASE)
OUTBOUND_CONTEXT = re.compile(r"internal|outbound|outgoing", re.IGNORECASE)
#: ``PJSIP/202-00000a2``, ``SIP/anna-0000001f``, ``Local/201@from-queue-…;1`` → the endpoint.
CHANNEL_ENDPOINT = re.compile(r"^[A-Za-z0-9_]+/([A-Za-z0-9_.]+?)(?:-[0-9a-fA-F]+)?(?:[@;].*)?$")
CLID_NUMBER = re.compile(r"<([^<>]*)>\s*$")
#: ASCII digits: ``\d`` would also take other scripts' digits, which the date parser refuses.
CDR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?")


@dataclass(frozen=True)
class CdrContext:
    """What the CDR adapter needs to know about our side of the calls."""

    source_system: str = "asterisk"
    #: Our own numbers (switchboard, trunks): a call from one of them goes out.
    own_numbers: tuple[str, ...] = ()
    phone_region: str = "FI"
    #: The zone of the PBX's times when known (``usegmtime=yes`` writes UTC); None leaves them
    #: naive, to be read in the configured zone with the assumption noted on the event.
    time_zone: str | None = None


def asterisk_cdr_to_call(row: Mapping[str, Any], context: CdrContext) -> dict[str, Any]:
    """One Asterisk CDR (the Master.csv columns by name) as a ``crm.call/1`` update.

    The legs of one call share ``linkedid`` and merge into one event; without it ``uniqueid``
    identifies the call. A CDR has no update counter across legs, so none is sent: among the
    legs, an answered one outranks unanswered ones.
    """
    cdr = {str(k).strip().lower(): "" if v is None else str(v).strip() for k, v in row.items()}
    return cdr_to_call(cdr, context)


def cdr_to_call(cdr: dict[str, str], context: CdrContext) -> dict[str, Any]:
    """:func:`asterisk_cdr_to_call` of a CDR whose column names are lower case and whose
    values are stripped strings, as :func:`read_cdr_csv` reads them: a file's rows skip
    normalising 18 names and values each (an eighth of the conversion)."""
    call_id = cdr.get("linkedid") or cdr.get("uniqueid")
    if not call_id:
        if not (cdr.get("channel") and cdr.get("start")):
            raise AdapterError("a CDR needs uniqueid or linkedid (or at least channel and start)")
        key = "|".join(cdr.get(c, "") for c in ("channel", "start", "src", "dst"))
        call_id = "cdr-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    disposition = cdr.get("disposition", "").upper()
    status = DISPOSITIONS.get(disposition, disposition.lower() or None)
    source = cdr.get("src") or _clid_number(cdr.get("clid", ""))
    destination = cdr.get("dst", "")
    direction = _cdr_direction(source, destination, cdr.get("dcontext", ""), context)
    answered = disposition == "ANSWERED"
    message: dict[str, Any] = {
        "schema": SCHEMA,
        "source_system": context.source_system,
        "call_id": call_id,
        "status": status,
        "direction": direction,
        "from": source or None,
        "to": destination or None,
        "agent": _cdr_agent(cdr, direction, context),
        "started_at": _cdr_time(cdr, "start", context),
        "answered_at": _cdr_time(cdr, "answer", context) if answered else None,
        "ended_at": _cdr_time(cdr, "end", context),
        "duration_s": _cdr_seconds(cdr, "billsec") if answered else None,
    }
    return {k: v for k, v in message.items() if v is not None}


def _clid_number(clid: str) -> str:
    match = CLID_NUMBER.search(clid)
    return match[1].strip() if match else ""


def _is_extension(value: str) -> bool:
    return value.isascii() and value.isdigit() and len(value) < 6


def _is_ours(value: str, context: CdrContext) -> bool:
    if _is_extension(value):
        return True
    region = context.phone_region
    return _e164(value, region) in _own_e164(context.own_numbers, region)


@functools.lru_cache(maxsize=64)
def _own_e164(own_numbers: tuple[str, ...], region: str) -> frozenset[str | None]:
    return frozenset(_e164(n, region) for n in own_numbers) - {None}


# A CDR file names the same callers and trunks row after row: each is parsed once.
@functools.lru_cache(maxsize=8192)
def _e164(raw: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _cdr_direction(source: str, destination: str, dcontext: str, context: CdrContext) -> str | None:
    """By the numbers first (an extension or our own number is our side), then the context."""
    ours_from, ours_to = _is_ours(source, context), _is_ours(destination, context)
    if ours_from and not ours_to and destination:
        return "outbound"
    if ours_to and not ours_from and source:
        return "inbound"
    if ours_from and ours_to:
        return None  # between our own extensions: an internal call
    if INBOUND_CONTEXT.search(dcontext):
        return "inbound"
    if OUTBOUND_CONTEXT.search(dcontext):
        return "outbound"
    return None


def _cdr_agent(cdr: dict[str, str], direction: str | None, context: CdrContext) -> str | None:
    """Our side's extension: the number dialled in, or the one that dialled out."""
    number, channel = (
        (cdr.get("src", ""), cdr.get("channel", ""))
        if direction == "outbound"
        else (cdr.get("dst", ""), cdr.get("dstchannel", ""))
    )
    if _is_extension(number):
        return number
    match = CHANNEL_ENDPOINT.match(channel)
    return match[1] if match else None


def _cdr_time(cdr: dict[str, str], column: str, context: CdrContext) -> str | None:
    text = cdr.get(column, "")
    if not text:
        return None
    if not CDR_TIME.fullmatch(text):
        raise AdapterError(f"CDR {column} {text[:40]!r} is not a time (YYYY-MM-DD HH:MM:SS)")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:  # the right shape, but 2026-02-30 or 25:05
        raise AdapterError(f"CDR {column} {text[:40]!r} is not a time: {exc}") from exc
    if not context.time_zone:
        return moment.isoformat()
    offset = _hour_offset(context.time_zone, text[:13])
    if offset is None:  # the offset changes within this hour
        return moment.replace(tzinfo=ZoneInfo(context.time_zone)).isoformat()
    return moment.isoformat() + offset


@functools.lru_cache(maxsize=16384)
def _hour_offset(zone: str, hour: str) -> str | None:
    """The UTC offset, as ``isoformat`` writes it, of every wall time in ``hour`` (the CDR
    time's ``YYYY-MM-DD HH``) in ``zone``, or None when it is not one offset. A file's rows
    share their hours: the zone's rules are read once an hour, not three times a row (the
    most of a row's conversion)."""
    start = datetime.fromisoformat(f"{hour}:00:00").replace(tzinfo=ZoneInfo(zone))
    end = start.replace(minute=59, second=59, microsecond=999999)
    if start.utcoffset() != end.utcoffset():
        return None
    return start.isoformat()[len("YYYY-MM-DDTHH:MM:SS") :]


def _cdr_seconds(cdr: dict[str, str], column: str) -> int | None:
    text = cdr.get(column, "")
    if not text:
        return None
    seconds = _non_negative_int(text)
    if seconds is None:
        raise AdapterError(f"CDR {column} {text[:40]!r} is not a number of seconds")
    return seconds


@dataclass(frozen=True)
class CdrRow:
    """A line of a Master.csv: its fields by lower-case column name, values stripped (or None
    with the error that makes it no CDR)."""

    line: int
    fields: dict[str, str] | None
    error: str = ""


def read_cdr_csv(text: str) -> Iterator[CdrRow]:
    """The rows of a Master.csv, with or without a header row (Asterisk writes none).

    Without a header, the columns are known by their number (``CDR_LAYOUTS``). A row is one
    line: a row that fits no layout, a quote not closed on its line, or a field the CSV reader
    refuses (more than 131,072 characters) is returned with its error, and the next line is
    read on its own, so one bad line never hides or changes the others. (A quote left open
    would otherwise take the lines after it into its field, silently when what it took made a
    row of the right length; a CDR holds no line break.)
    """
    header: tuple[str, ...] | None = None
    # At CR, LF or CRLF, as the CSV reader splits lines.
    for number, line in enumerate(io.StringIO(text, newline=""), start=1):
        if not line.endswith(("\n", "\r")):
            line += "\n"  # the last line: an open quote then keeps its end, as the others do
        try:
            values = next(csv.reader((line,)))
        except StopIteration:
            continue
        except csv.Error as exc:
            yield CdrRow(number, None, f"not CSV: {exc}")
            continue
        if values and ("\n" in values[-1] or "\r" in values[-1]):
            yield CdrRow(number, None, "a quote opened on this line is not closed on it")
            continue
        if not values or all(not v.strip() for v in values):
            continue
        # A header row names the disposition column; a data row of a headerless file, read
        # by the thousand, seldom holds the word at all: lowered whole only when it does.
        if header is None and "disposition" in ",".join(values).lower():
            lowered = tuple(v.strip().lower() for v in values)
            if "disposition" in lowered and "src" in lowered:
                header = lowered
                continue
        columns = header or CDR_LAYOUTS.get(len(values))
        if columns is None or len(columns) != len(values):
            expected = len(columns) if columns else "16-21"
            yield CdrRow(number, None, f"{len(values)} fields, expected {expected}")
            continue
        yield CdrRow(number, dict(zip(columns, map(str.strip, values), strict=True)))
