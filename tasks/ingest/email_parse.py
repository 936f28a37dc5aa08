"""Parse raw RFC 5322 bytes into what the email stage needs, defensively.

Nothing here raises on malformed input: whatever cannot be read is noted in ``notes`` and the
rest is still returned. Before the standard library's parser sees a byte, a linear scan of the
MIME structure enforces the caps on the number of parts and the nesting depth (the parser
recurses per level and builds an object per part, so a hostile message could otherwise exhaust
the stack, the memory or the task's time). Large base64 bodies are cut out of the copy the
parser reads and decoded straight from the raw bytes, so a 25 MB attachment is never held as a
Python string, a list of lines and a joined payload at once.
"""

from __future__ import annotations

import binascii
import codecs
import email
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import itertools
import quopri
import re
import secrets
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from typing import Any
from zoneinfo import ZoneInfo

import bs4

# -- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseLimits:
    """Caps on the work one message may cause (``CRM_EMAIL_MAX_PARTS`` / ``_MAX_DEPTH``)."""

    max_parts: int = 1000
    max_depth: int = 20
    #: Base64 bodies above this size are decoded from the raw bytes, not through the parser.
    slice_threshold: int = 32 * 1024
    #: HTML above this size is stripped of tags with a regular expression instead of parsed.
    max_html_bytes: int = 4 * 1024 * 1024


#: Inline forwards inside inline forwards are followed this deep (a forward of a forward).
MAX_INLINE_FORWARDS = 5
#: Message-IDs and references longer than this are replaced by a hash (the columns are bounded).
MAX_ID_LENGTH = 400
#: Header values are read up to this length.
MAX_HEADER_CHARS = 32 * 1024
#: Addresses per header that are matched to parties (each costs database look-ups).
MAX_ADDRESSES = 100

# -- auto-replies (RFC 3834 and the headers mail systems use in practice) -----------------------

AUTO_REPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponder")
BULK_PRECEDENCE = {"bulk", "junk", "auto_reply"}
#: Delivery status notifications and read receipts: never a memo, often half of a mail loop.
REPORT_TYPES = {"delivery-status", "disposition-notification"}

# -- inline forwards: the marker lines of Gmail, Outlook, Apple Mail and Thunderbird ------------

FORWARD_MARKERS = re.compile(
    r"^[ \t>]*(?:"
    # Gmail "---------- Forwarded message ---------", Thunderbird "-------- Forwarded Message
    # --------", Outlook "-----Original Message-----" and their Finnish and Swedish forms.
    r"-{2,}\s*(?:forwarded message|original message|alkuperäinen viesti|välitetty viesti"
    r"|edelleenlähetetty viesti|ursprungligt meddelande|vidarebefordrat meddelande)\s*-{2,}"
    # Apple Mail.
    r"|begin forwarded message:|välitetty viesti alkaa:|aloita välitetty viesti:"
    r"|välitetty viesti:|vidarebefordrat brev:"
    r")[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
#: Outlook's block without a marker line (often under a line of underscores): a "From:" line
#: followed within a few lines by a "Sent:" line, in English or Finnish.
OUTLOOK_BLOCK = re.compile(
    r"^[ \t>]*\**(?:From|Lähettäjä|Från)\**:[ \t].*\n(?:.*\n){0,3}?"
    r"[ \t>]*\**(?:Sent|Lähetetty|Skickat|Date|Päivämäärä)\**:[ \t]",
    re.IGNORECASE | re.MULTILINE,
)
UNDERSCORE_LINE = re.compile(r"\n[ \t]*_{10,}[ \t]*\Z")
HEADER_NAMES = {
    "from": "from",
    "lähettäjä": "from",
    "från": "from",
    "sent": "date",
    "date": "date",
    "lähetetty": "date",
    "päivämäärä": "date",
    "päiväys": "date",
    "pvm": "date",
    "skickat": "date",
    "datum": "date",
    "to": "to",
    "vastaanottaja": "to",
    "till": "to",
    "cc": "cc",
    "kopio": "cc",
    "subject": "subject",
    "aihe": "subject",
    "ämne": "subject",
}
HEADER_LINE = re.compile(r"^[ \t>]*\**([^\W\d][\w .-]{0,30}?)\**:\**(?:[ \t]+(.*))?$")
#: An address in free text. A match starts only where a run of local-part characters starts:
#: without the look-behind, a long run without an "@" is rescanned from each of its characters
#: (quadratic: 70 KB of header took seconds).
ADDRESS = re.compile(r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")

# -- dates as mail clients print them in forward blocks -----------------------------------------

MONTHS = {
    **{
        name: number
        for number, name in enumerate(
            [
                "tammikuuta",
                "helmikuuta",
                "maaliskuuta",
                "huhtikuuta",
                "toukokuuta",
                "kesäkuuta",
                "heinäkuuta",
                "elokuuta",
                "syyskuuta",
                "lokakuuta",
                "marraskuuta",
                "joulukuuta",
            ],
            start=1,
        )
    },
    **{
        name: number
        for number, name in enumerate(
            [
                "january",
                "february",
                "march",
                "april",
                "may",
                "june",
                "july",
                "august",
                "september",
                "october",
                "november",
                "december",
            ],
            start=1,
        )
    },
}
LOOSE_TIME = re.compile(
    r"\b(\d{1,2})[.:](\d{2})(?:[.:](\d{2}))?(?:\s*([ap])\.?\s*m\.?\b)?", re.IGNORECASE
)
LOOSE_OFFSET = re.compile(
    r"(?:\b(?:GMT|UTC)\s*([+-])(\d{1,2})(?::?(\d{2}))?\b|(?<![\d:.])([+-])(\d{2}):?(\d{2})\b)"
)
NUMERIC_DATE = re.compile(r"\b(\d{1,2})\.\s*(\d{1,2})\.\s*(\d{4})\b")
DAY_MONTH_YEAR = re.compile(r"\b(\d{1,2})\.?\s+([^\W\d_]{3,})\.?,?\s+(\d{4})\b")
MONTH_DAY_YEAR = re.compile(r"\b([^\W\d_]{3,})\.?\s+(\d{1,2}),?\s+(\d{4})\b")
ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")

# -- MIME scanning ------------------------------------------------------------------------------

_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.M)
_TRANSFER_ENCODING = re.compile(
    rb"^content-transfer-encoding[ \t]*:[ \t]*([^\s;]*)", re.IGNORECASE | re.MULTILINE
)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,62}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t\r\n]+(=\?)")
_SURROGATES = re.compile("[\ud800-\udfff]")
#: Labels under which mail clients send Windows-1252 (the WHATWG Encoding Standard's mapping).
WINDOWS_1252_LABELS = {
    "iso-8859-1",
    "iso8859-1",
    "iso_8859-1",
    "latin1",
    "latin-1",
    "l1",
    "us-ascii",
    "ascii",
    "windows-1252",
    "cp1252",
    "x-cp1252",
}
_SINGLE_BYTE = re.compile(r"^(?:iso[-_ ]?8859|windows-?12\d\d|cp12\d\d|latin|koi8|mac)")
UTF8_LABELS = {"utf-8", "utf8", "unicode-1-1-utf-8"}


@dataclass
class Attachment:
    filename: str | None
    content_type: str
    content: bytes


@dataclass
class ParsedEmail:
    message_id: str | None = None
    subject: str = ""
    from_: tuple[str, str] | None = None
    to: list[tuple[str, str]] = field(default_factory=list)
    cc: list[tuple[str, str]] = field(default_factory=list)
    date: datetime | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    text: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    #: The forwarded original (an attached message/rfc822, or an inline forward block).
    forwarded: ParsedEmail | None = None
    #: The forwarder's own text above an inline forward, or the text beside an attached one.
    forward_memo: str = ""
    #: The original was found in the text (an inline forward), not as an attached message.
    forwarded_inline: bool = False
    #: Further attached emails beside the first (their text is added to the event's text).
    other_messages: list[ParsedEmail] = field(default_factory=list)
    #: Why the message is not an event (an auto-reply, a delivery report), or None.
    auto_reply: str | None = None
    #: The body and attachments were not read because the structure is over the caps.
    structure_refused: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def thread_candidates(self) -> list[str]:
        """Message-IDs this message answers, oldest first (RFC 5322 §3.6.4)."""
        found = list(self.references)
        if self.in_reply_to and self.in_reply_to not in found:
            found.append(self.in_reply_to)
        return found


def raw_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# -- entry point --------------------------------------------------------------------------------


def parse_email(raw: bytes, zone: ZoneInfo, limits: ParseLimits | None = None) -> ParsedEmail:
    limits = limits or ParseLimits()
    shape = scan_structure(raw, limits)
    if shape.refused is not None:
        parsed = _headers_only(raw, zone, shape.header_end)
        parsed.structure_refused = shape.refused
        parsed.notes.append(
            f"{shape.refused}: the body and attachments were not read"
            " (the raw message is kept as a document)"
        )
        return _clean_strings(parsed)
    sliced = _SlicedBodies(raw, shape.slices)
    try:
        message = email.message_from_bytes(sliced.skeleton(), policy=email.policy.compat32)
        if not sliced.bind(message):
            # The scan and the parser disagree on the structure (a malformed message): parse
            # the whole message the ordinary way; the caps still hold, the scan saw its shape.
            sliced = _SlicedBodies(raw, [])
            message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # the parser is lenient; this is the last line of defence
        parsed = _headers_only(raw, zone, shape.header_end)
        parsed.notes.append(f"unparseable MIME structure ({type(exc).__name__})")
        return _clean_strings(parsed)
    walker = _Walker(zone, limits, sliced)
    parsed = walker.message(message, depth=0)
    parsed.auto_reply = _auto_reply(message, parsed.notes)
    return _clean_strings(parsed)


# -- the structural scan ------------------------------------------------------------------------


@dataclass
class Shape:
    parts: int = 0
    depth: int = 0
    #: Why the structure is refused (over a cap), or None.
    refused: str | None = None
    #: Where the top-level header block ends.
    header_end: int = 0
    #: (start, end) of large base64 leaf bodies, in order.
    slices: list[tuple[int, int]] = field(default_factory=list)


def scan_structure(raw: bytes, limits: ParseLimits) -> Shape:
    """The MIME tree's size and depth from the raw bytes, linear in their length.

    Mirrors the standard library's feed parser closely enough to bound its work: a multipart
    entity's parts lie between the delimiter lines of its own boundary, a ``message/*`` entity
    (other than a delivery status) contains one message.
    """
    shape = Shape()
    # (start, end, depth, default content type) of entities still to look at.
    pending: list[tuple[int, int, int, str]] = [(0, len(raw), 0, "text/plain")]
    first = True
    while pending:
        start, end, depth, default_type = pending.pop()
        header_end, body_start = _header_block(raw, start, end)
        if first:
            shape.header_end, first = header_end, False
        headers = raw[start:header_end]
        content_type, boundary = _content_type_of(headers, default_type)
        if content_type.startswith("multipart/") and boundary:
            children = _split_parts(raw, body_start, end, boundary.encode("latin-1", "replace"))
            if children:
                if depth + 1 > limits.max_depth:
                    shape.refused = f"MIME nesting deeper than the {limits.max_depth}-level limit"
                    return shape
                shape.depth = max(shape.depth, depth + 1)
                shape.parts += len(children)
                if shape.parts > limits.max_parts:
                    shape.refused = f"more than the {limits.max_parts}-part limit of MIME parts"
                    return shape
                child_type = (
                    "message/rfc822" if content_type == "multipart/digest" else "text/plain"
                )
                # Reversed, so that the stack yields the parts in document order.
                pending.extend((s, e, depth + 1, child_type) for s, e in reversed(children))
            continue
        if content_type.startswith("message/") and content_type != "message/delivery-status":
            if depth + 1 > limits.max_depth:
                shape.refused = f"MIME nesting deeper than the {limits.max_depth}-level limit"
                return shape
            shape.depth = max(shape.depth, depth + 1)
            pending.append((body_start, end, depth + 1, "text/plain"))
            continue
        encoding = _TRANSFER_ENCODING.search(headers)
        if (
            encoding is not None
            and encoding[1].lower() == b"base64"
            and end - body_start > limits.slice_threshold
        ):
            shape.slices.append((body_start, _strip_line_end(raw, body_start, end)))
    shape.slices.sort()
    return shape


def _header_block(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the headers, start of the body) of the entity at ``start``."""
    if raw.startswith(b"\r\n", start):
        return start, start + 2
    if raw.startswith(b"\n", start):
        return start, start + 1
    blank = _BLANK_LINE.search(raw, start, end)
    if blank is None:
        return end, end
    return blank.start(), blank.end()


def _content_type_of(headers: bytes, default: str) -> tuple[str, str | None]:
    found = _CONTENT_TYPE.search(headers)
    if found is None:
        return default, None
    value = re.sub(rb"\r?\n[ \t]", b" ", found[1]).decode("latin-1")
    # The standard library's own parameter parsing (RFC 2231 continuations included), on a
    # one-header compat32 message: the boundary the parser will use is the one we look for.
    probe = email.message.Message()
    probe.set_default_type(default)
    try:
        probe["Content-Type"] = value
        return probe.get_content_type(), probe.get_boundary()
    except Exception:
        return default, None


def _split_parts(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each part between delimiter lines ``--boundary``."""
    delimiter = b"--" + boundary
    lines: list[tuple[int, int]] = []  # (line start, line end) of each delimiter line
    position = raw.find(delimiter, start, end)
    while position != -1:
        if position == start or raw[position - 1] == 0x0A:
            after = position + len(delimiter)
            line_end = raw.find(b"\n", after, end)
            line_end = end if line_end == -1 else line_end + 1
            rest = raw[after:line_end]
            closing = rest.startswith(b"--")
            if not (rest[2:] if closing else rest).strip(b" \t\r\n"):
                lines.append((position, line_end))
                if closing:
                    break
        position = raw.find(delimiter, position + 1, end)
    parts = []
    for (_, part_start), (next_line, _) in itertools.pairwise(lines):
        parts.append((part_start, next_line))
    if lines and not raw.startswith(delimiter + b"--", lines[-1][0]):
        parts.append((lines[-1][1], end))  # no closing delimiter: the last part runs to the end
    return parts


def _strip_line_end(raw: bytes, start: int, end: int) -> int:
    """``end`` without the line break that belongs to the next delimiter line."""
    if end > start and raw[end - 1] == 0x0A:
        end -= 1
        if end > start and raw[end - 1] == 0x0D:
            end -= 1
    return end


class _SlicedBodies:
    """Large base64 bodies replaced by unique markers in the copy that the parser reads."""

    def __init__(self, raw: bytes, slices: list[tuple[int, int]]) -> None:
        self.raw = raw
        self.slices = slices
        nonce = secrets.token_hex(8)
        self.markers = [f"crm-sliced-body-{nonce}-{i}" for i in range(len(slices))]
        self.by_part: dict[int, int] = {}

    def skeleton(self) -> bytes:
        if not self.slices:
            return self.raw
        pieces: list[bytes] = []
        previous = 0
        for (start, end), marker in zip(self.slices, self.markers, strict=True):
            pieces += [self.raw[previous:start], marker.encode("ascii")]
            previous = end
        pieces.append(self.raw[previous:])
        return b"".join(pieces)

    def bind(self, message: Message) -> bool:
        """Find each marker as exactly one leaf's payload; False when the parse disagrees."""
        if not self.slices:
            return True
        index = {marker: i for i, marker in enumerate(self.markers)}
        for part in message.walk():
            payload = part.get_payload()
            if isinstance(payload, str) and payload.strip() in index:
                self.by_part[id(part)] = index.pop(payload.strip())
        return not index

    def payload(self, part: Message) -> bytes | None:
        """The decoded bytes of a sliced body, or None when ``part`` is not sliced."""
        number = self.by_part.get(id(part))
        if number is None:
            return None
        start, end = self.slices[number]
        data = memoryview(self.raw)[start:end]
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            # Bad padding or stray characters: keep what decodes, as the parser itself does.
            cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            cleaned = cleaned[: len(cleaned) - len(cleaned) % 4]
            try:
                return binascii.a2b_base64(cleaned)
            except binascii.Error:
                return b""


# -- reading the parsed tree --------------------------------------------------------------------


class _Walker:
    def __init__(self, zone: ZoneInfo, limits: ParseLimits, sliced: _SlicedBodies) -> None:
        self.zone = zone
        self.limits = limits
        self.sliced = sliced
        self.parts_seen = 0

    def message(self, message: Message, depth: int) -> ParsedEmail:
        parsed = ParsedEmail()
        _read_headers(message, parsed, self.zone)
        notes = parsed.notes

        if depth > self.limits.max_depth:
            notes.append(f"nesting deeper than {self.limits.max_depth}: not read further")
            return parsed
        body_part = _find_body(message, self.limits.max_parts)
        if body_part is not None:
            text = decode_text(self.payload(body_part, notes), _charset(body_part), notes)
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if body_part.get_content_subtype() == "html":
                text = html_to_text(text, self.limits, notes)
                notes.append("HTML-only body converted to text")
            parsed.text = text.strip()

        for part in self.leaf_parts(message, depth, notes):
            if part is body_part:
                continue
            content_type = _media_type(part)
            if content_type.startswith("message/") and content_type != "message/delivery-status":
                inner = self.inner_message(part)
                if inner is None:
                    notes.append("an attached message could not be read")
                    continue
                original = self.message(inner, depth + 1)
                if parsed.forwarded is None:
                    parsed.forwarded = original
                    parsed.forward_memo = parsed.text
                else:
                    parsed.other_messages.append(original)
                continue
            if part.get_content_maintype() == "multipart":
                continue
            if content_type.startswith("text/") and not _is_attachment(part):
                continue  # alternative bodies (the HTML twin of the text we kept)
            content = self.payload(part, notes)
            name = _filename(part, notes, _charset_hint(message))
            parsed.attachments.append(Attachment(name, content_type, content))

        if parsed.forwarded is None and parsed.text:
            _inline_forward(parsed, self.zone, MAX_INLINE_FORWARDS)
        return parsed

    def payload(self, part: Message, notes: list[str]) -> bytes:
        sliced = self.sliced.payload(part)
        if sliced is not None:
            return sliced
        try:
            content = part.get_payload(decode=True)
        except Exception as exc:
            notes.append(f"a part could not be decoded ({type(exc).__name__})")
            return b""
        return content if isinstance(content, bytes) else b""

    def inner_message(self, part: Message) -> Message | None:
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        if isinstance(payload, Message):
            return payload
        return None

    def leaf_parts(self, message: Message, depth: int, notes: list[str]) -> list[Message]:
        """The parts below ``message``, depth-first, not descending into attached messages.

        The scan has already bounded the tree; the counts here keep that promise even when the
        parser read the structure differently from the scan.
        """
        if not message.is_multipart() or _media_type(message).startswith("message/"):
            return [message]  # a single-part email: the part is its body or its attachment
        result: list[Message] = []
        pending: list[tuple[Message, int]] = [(message, depth)]
        while pending:
            container, level = pending.pop()
            payload = container.get_payload()
            if not isinstance(payload, list):
                continue
            if level >= self.limits.max_depth:
                notes.append(f"nesting deeper than {self.limits.max_depth}: inner parts ignored")
                continue
            children: list[tuple[Message, int]] = []
            for part in payload:
                if not isinstance(part, Message):
                    continue
                self.parts_seen += 1
                if self.parts_seen > self.limits.max_parts:
                    notes.append(f"more than {self.limits.max_parts} MIME parts: the rest ignored")
                    return result
                if part.is_multipart() and not _media_type(part).startswith("message/"):
                    children.append((part, level + 1))
                else:
                    result.append(part)
            pending.extend(reversed(children))
        return result


def _find_body(message: Message, max_parts: int) -> Message | None:
    """The part a reader sees as the email's text: the first inline ``text/plain`` outside
    attached emails, else the first inline ``text/html`` (the standard library's
    ``get_body``, without its header objects)."""
    found: dict[str, Message] = {}
    pending = [message]
    seen = 0
    while pending and seen <= max_parts * 2:
        part = pending.pop()
        seen += 1
        media_type = _media_type(part)
        if media_type.startswith("message/"):
            continue  # an attached email's text is its own, not ours
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                pending.extend(p for p in reversed(payload) if isinstance(p, Message))
            continue
        if media_type in ("text/plain", "text/html") and _disposition(part) != "attachment":
            found.setdefault(media_type, part)
            if media_type == "text/plain":
                break
    return found.get("text/plain") or found.get("text/html")


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


def _headers_only(raw: bytes, zone: ZoneInfo, header_end: int) -> ParsedEmail:
    parsed = ParsedEmail()
    try:
        message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            raw[:header_end] + b"\r\n\r\n"
        )
    except Exception as exc:
        parsed.notes.append(f"headers unreadable ({type(exc).__name__})")
        return parsed
    _read_headers(message, parsed, zone)
    parsed.auto_reply = _auto_reply(message, parsed.notes)
    return parsed


def _read_headers(message: Message, parsed: ParsedEmail, zone: ZoneInfo) -> None:
    notes = parsed.notes
    parsed.message_id = _msgid(_header(message, "Message-ID", notes), notes)
    parsed.subject = " ".join(_header(message, "Subject", notes).split())
    senders = _addresses(message, "From", notes)
    parsed.from_ = senders[0] if senders else None
    parsed.to = _addresses(message, "To", notes)
    parsed.cc = _addresses(message, "Cc", notes)
    parsed.in_reply_to = _msgid(_header(message, "In-Reply-To", notes), notes)
    parsed.references = [
        _bounded_id(r, notes)
        for r in re.findall(r"<([^<>\s]+)>", _header(message, "References", notes))
    ][-50:]
    date_text = _header(message, "Date", notes)
    if date_text:
        try:
            parsed.date = email.utils.parsedate_to_datetime(date_text)
            if parsed.date.tzinfo is None:
                parsed.date = parsed.date.replace(tzinfo=zone)
                notes.append(f"Date had no offset; read as {zone.key}")
        except (TypeError, ValueError, IndexError, OverflowError):
            parsed.date = parse_loose_date(date_text, zone, [])
        parsed.date = in_utc_range(parsed.date)
        if parsed.date is None:
            notes.append(f"unreadable Date header {date_text[:80]!r}")


def _header(message: Message, name: str, notes: list[str]) -> str:
    """A header's text: RFC 2047 words and raw 8-bit bytes decoded, folding undone.

    The message is parsed with the compat32 policy, which keeps header values as received;
    decoding them here costs a regular expression, where the default policy's header objects
    cost a full parse per read (the bulk of the parse time of a typical email).
    """
    raws = _raw_headers(message, name)
    if not raws:
        return ""
    raw = raws[0]
    if len(raw) > MAX_HEADER_CHARS:
        notes.append(f"header {name} of {len(raw)} characters cut to {MAX_HEADER_CHARS}")
        raw = raw[:MAX_HEADER_CHARS]
    if raw.isascii() and "=?" not in raw:
        return " ".join(raw.split())
    return decode_header_text(raw, notes, name, _charset_hint(message)).strip()


def _charset_hint(message: Message) -> str | None:
    """The charset of the message's first text part that names one."""
    try:
        for part in message.walk():
            if part.get_content_maintype() == "text" and (charset := _charset(part)):
                return charset
    except Exception:
        return None
    return None


def _raw_headers(message: Message, name: str) -> list[str]:
    """Every value of header ``name`` as received (no parsing: cheap whatever the value)."""
    try:
        return [str(value) for key, value in message.raw_items() if key.lower() == name.lower()]
    except Exception:
        return []


def decode_header_text(
    raw: str, notes: list[str], name: str = "header", hint: str | None = None
) -> str:
    """A header's text from its raw form: 8-bit bytes and RFC 2047 words, any charset.

    Raw 8-bit bytes are read in ``hint``, the charset of the message's text (mailers that
    send unencoded headers write them in the charset of their body), else as UTF-8.
    """
    data = raw.encode("utf-8", "surrogateescape")
    text = decode_text(data, hint or "utf-8", [])
    text = re.sub(r"\r?\n[ \t]", " ", text)
    text = _BETWEEN_WORDS.sub(r"\1\2", text)  # RFC 2047 §6.2: space between words is dropped

    def word(match: re.Match[str]) -> str:
        charset, kind, payload = match[1].split("*")[0], match[2].upper(), match[3]
        try:
            if kind == "B":
                padded = payload + "=" * (-len(payload) % 4)
                octets = binascii.a2b_base64(padded.encode("ascii", "replace"))
            else:
                octets = quopri.decodestring(payload.replace("_", " ").encode("ascii", "replace"))
        except (binascii.Error, ValueError):
            return match[0]
        return decode_text(octets, charset, notes)

    decoded = _ENCODED_WORD.sub(word, text)
    if name != "address" and not raw.isascii():
        notes.append(f"header {name}: raw 8-bit text read as {hint or 'UTF-8'}")
    return decoded


def _addresses(message: Message, name: str, notes: list[str]) -> list[tuple[str, str]]:
    """The addresses of an address header, at most :data:`MAX_ADDRESSES`.

    Read with the compat32 address parser on the raw value (RFC 2047 and 8-bit names decoded
    first): linear, where the default policy's parser takes seconds on a long list.
    """
    values = []
    for raw in _raw_headers(message, name):
        if len(raw) > MAX_HEADER_CHARS:
            notes.append(f"header {name} of {len(raw)} characters cut to {MAX_HEADER_CHARS}")
            raw = raw[:MAX_HEADER_CHARS]
        if "=?" in raw or not raw.isascii():
            raw = decode_header_text(raw, notes, "address", _charset_hint(message))
        values.append(" ".join(raw.split()))
    try:
        pairs = email.utils.getaddresses(values)
    except Exception as exc:
        notes.append(f"header {name} unreadable: {type(exc).__name__}")
        return []
    found = [(n, a.strip().lower()) for n, a in pairs if "@" in a and len(a) <= 320]
    if not found and any(values):
        # "Name [mailto:addr]" and other shapes getaddresses does not read: take the address.
        found = [("", a.lower()) for a in ADDRESS.findall(" ".join(values)) if len(a) <= 320]
    found = list(dict.fromkeys(found))
    if len(found) > MAX_ADDRESSES:
        notes.append(f"{name}: {len(found)} addresses, the first {MAX_ADDRESSES} are matched")
        found = found[:MAX_ADDRESSES]
    return found


def _msgid(value: str, notes: list[str]) -> str | None:
    value = value.strip()
    found = re.findall(r"<([^<>\s]+)>", value)
    if found:
        return _bounded_id(found[0], notes)
    value = "".join(value.split())
    return _bounded_id(value, notes) if value else None


def _bounded_id(value: str, notes: list[str]) -> str:
    if len(value) <= MAX_ID_LENGTH:
        return value
    notes.append(f"a message id of {len(value)} characters is identified by its SHA-256")
    return "id-sha256:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


def _media_type(part: Message) -> str:
    """The declared media type, or application/octet-stream when it is not one."""
    try:
        value = part.get_content_type().lower()
    except Exception:
        return "application/octet-stream"
    return value if _MEDIA_TYPE.match(value) else "application/octet-stream"


def _charset(part: Message) -> str | None:
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment" or bool(part.get_filename())
    except Exception:
        return False


def _filename(part: Message, notes: list[str], hint: str | None) -> str | None:
    """The attachment's name, RFC 2231 and RFC 2047 decoded (raw 8-bit names too)."""
    try:
        name = part.get_filename()
    except Exception:
        name = None
        notes.append("attachment filename unreadable")
    if name is not None and not isinstance(name, str):
        name = str(name)
    if name and "\ufffd" in name:
        # Raw 8-bit bytes in the header, which compat32 shows as U+FFFD: read the header's raw
        # bytes in the message's charset, then its parameters.
        for header in ("Content-Disposition", "Content-Type"):
            raw = next(iter(_raw_headers(part, header)), None)
            if raw is None:
                continue
            probe = email.message.Message()
            try:
                probe[header] = decode_header_text(raw, [], "address", hint)
                better = probe.get_filename() or probe.get_param("name")
            except Exception:
                continue
            if isinstance(better, str) and better:
                name = better
                break
    if name and "=?" in name:
        name = decode_header_text(name, [], "filename")
    return name


# -- text ---------------------------------------------------------------------------------------


def decode_text(data: bytes, charset: str | None, notes: list[str]) -> str:
    """Bytes as text under a declared charset that may be missing, unknown or a lie.

    Latin-1 and ASCII labels are read as Windows-1252 (what mail clients actually send, € at
    0x80); text that is valid UTF-8 with non-ASCII characters is UTF-8 whatever its label says
    (other 8-bit text is practically never valid UTF-8); unknown labels fall back to UTF-8,
    then Windows-1252. Nothing here raises.
    """
    label = (charset or "").strip().strip('"').lower()
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        pass
    try:
        as_utf8 = data.decode("utf-8")
    except UnicodeDecodeError:
        as_utf8 = None
    if label in UTF8_LABELS or not label:
        if as_utf8 is not None:
            return as_utf8
        replaced = data.decode("utf-8", "replace")
        if any(ch > "\x7f" and ch != "\ufffd" for ch in replaced):
            notes.append("invalid UTF-8 bytes replaced")
            return replaced
        notes.append(f"text labelled {label or 'without a charset'} read as Windows-1252")
        return _windows_1252(data)
    if label in WINDOWS_1252_LABELS or _SINGLE_BYTE.match(label):
        # Valid UTF-8 with non-ASCII characters is practically never 8-bit text: the label lies.
        if as_utf8 is not None:
            notes.append(f"text labelled {label} is UTF-8")
            return as_utf8
        if label in WINDOWS_1252_LABELS:
            return _windows_1252(data)
    try:
        codec = codecs.lookup(label)
        if not getattr(codec, "_is_text_encoding", True):
            raise LookupError(label)
    except (LookupError, ValueError):  # ValueError: a NUL in the label
        notes.append(f"unknown charset {label[:40]!r}; read as UTF-8 or Windows-1252")
        return as_utf8 if as_utf8 is not None else _windows_1252(data)
    try:
        return data.decode(codec.name)
    except UnicodeDecodeError:
        try:
            # Some codecs (idna, punycode) support no error handler but "strict".
            replaced = data.decode(codec.name, "replace")
        except Exception:
            pass
        else:
            notes.append(f"text not valid {label}; undecodable bytes replaced")
            return replaced
    except Exception:
        pass
    notes.append(f"charset {label[:40]!r} unusable; read as UTF-8 with replacements")
    return data.decode("utf-8", "replace")


def _windows_1252(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # the five bytes Windows-1252 leaves undefined


_BLOCK_TAGS = [
    "p",
    "div",
    "li",
    "tr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "table",
    "blockquote",
    "pre",
    "hr",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "section",
    "article",
    "header",
    "footer",
    "address",
]


def html_to_text(
    html: str, limits: ParseLimits | None = None, notes: list[str] | None = None
) -> str:
    """Readable text from HTML (Beautiful Soup); the HTML itself is never stored for display."""
    limits = limits or ParseLimits()
    notes = notes if notes is not None else []
    if len(html) > limits.max_html_bytes:
        notes.append(f"HTML over {limits.max_html_bytes} bytes: tags stripped, not laid out")
        return _tidy(re.sub(r"<[^>]{0,10000}>", " ", html))
    try:
        with warnings.catch_warnings():
            # Text that looks like a file name or XML is still HTML mail; the warnings are noise.
            warnings.simplefilter("ignore")
            soup = bs4.BeautifulSoup(html, "html.parser")
            for tag in soup(["script", "style", "head", "title", "template", "noscript"]):
                tag.decompose()
            for tag in soup.find_all("br"):
                tag.replace_with("\n")
            # Only insert_before: insert_after and append find the tag's last descendant,
            # which makes deeply nested markup quadratic. A block's start breaks the line.
            for tag in soup.find_all([*_BLOCK_TAGS, "td", "th"]):
                if tag.name in ("td", "th"):
                    tag.insert_before(" ")
                    continue
                tag.insert_before("\n")
                if tag.next_sibling is not None:  # the block's end breaks the line too
                    tag.next_sibling.insert_before("\n")
            text = soup.get_text()
    except Exception as exc:  # RecursionError on absurd nesting, parser errors
        notes.append(f"HTML not laid out ({type(exc).__name__}): tags stripped")
        text = re.sub(r"<[^>]{0,10000}>", " ", html)
    return _tidy(text)


def _tidy(text: str) -> str:
    lines = [" ".join(line.replace("\xa0", " ").split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- auto-replies -------------------------------------------------------------------------------


def _auto_reply(message: Message, notes: list[str]) -> str | None:
    auto = _header(message, "Auto-Submitted", notes).lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"auto-reply: Auto-Submitted: {auto[:100]}"
    for name in AUTO_REPLY_HEADERS:
        if _header(message, name, notes):
            return f"auto-reply: {name} header present"
    precedence = _header(message, "Precedence", notes).lower()
    if precedence in BULK_PRECEDENCE:
        return f"auto-reply or bulk mail: Precedence: {precedence}"
    try:
        report = message.get_content_type() == "multipart/report" and (
            str(message.get_param("report-type") or "").lower() in REPORT_TYPES
        )
    except Exception:
        report = False
    if report:
        return "automatic report: a delivery status notification or read receipt"
    return None


# -- inline forwards ----------------------------------------------------------------------------


def _inline_forward(parsed: ParsedEmail, zone: ZoneInfo, levels: int) -> None:
    """Find an inline forward ("-----Alkuperäinen viesti-----", Outlook blocks, …)."""
    if levels <= 0:
        return
    text = parsed.text
    marker = FORWARD_MARKERS.search(text)
    block = OUTLOOK_BLOCK.search(text)
    if marker and not (block and block.start() < marker.start()):
        memo, rest = text[: marker.start()], text[marker.end() :]
    elif block:
        memo, rest = text[: block.start()], text[block.start() :]
        memo = UNDERSCORE_LINE.sub("", memo.rstrip())
    else:
        return
    headers: dict[str, str] = {}
    lines = rest.split("\n")
    consumed = 0
    for line in lines:
        stripped = line.strip()
        if not stripped.strip(">").strip():
            consumed += 1
            if headers:
                break
            continue
        match = HEADER_LINE.match(stripped)
        if match is None:
            break
        name = HEADER_NAMES.get(match[1].strip().lower())
        if name is None and not headers:
            break  # the first line after the marker must be a header we know
        if name is not None:
            headers.setdefault(name, (match[2] or "").strip().strip("*").strip())
        consumed += 1
    if "from" not in headers:
        return
    original = ParsedEmail()
    sender = _loose_addresses(headers["from"])
    original.from_ = sender[0] if sender else None
    for name in ("to", "cc"):
        if name in headers:
            setattr(original, name, _loose_addresses(headers[name]))
    original.subject = headers.get("subject", "")
    original.date = parse_loose_date(headers.get("date", ""), zone, original.notes)
    original.text = "\n".join(lines[consumed:]).strip()
    parsed.forwarded = original
    parsed.forwarded_inline = True
    parsed.forward_memo = memo.strip()
    _inline_forward(original, zone, levels - 1)


def _loose_addresses(text: str) -> list[tuple[str, str]]:
    """Addresses as a mail client prints them: "Name <a@b>", "Name [mailto:a@b]", "a@b"; "; "."""
    text = re.sub(r"\[mailto:([^\]]+)\]", r"<\1>", text.replace(";", ","))
    pairs = [(n, a.lower()) for n, a in email.utils.getaddresses([text]) if "@" in a]
    if pairs:
        return pairs
    return [("", a.lower()) for a in ADDRESS.findall(text)]


def parse_loose_date(text: str, zone: ZoneInfo, notes: list[str]) -> datetime | None:
    """Dates as mail clients print them in forward blocks, Finnish and English.

    "Tue, 24 Nov 2026 10:00:00 +0200", "Tue, Nov 24, 2026 at 10:00 AM", "ti 24.11.2026 klo
    10.00", "maanantai 23. marraskuuta 2026 14.02", "24 November 2026 at 10.00.00 EET",
    "November 24, 2026 at 10:00:00 AM GMT+2". Without an offset the time is read in ``zone``.
    """
    text = " ".join(text.replace("*", " ").split())
    if not text:
        return None
    try:
        value = email.utils.parsedate_to_datetime(text)
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone)
        return in_utc_range(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        pass
    day = _loose_day(text)
    if day is None:
        notes.append(f"forwarded date {text[:60]!r} not understood")
        return None
    year, month, day_of_month, date_end = day
    hour = minute = second = 0
    clock = LOOSE_TIME.search(text, date_end)
    if clock:
        hour, minute, second = int(clock[1]), int(clock[2]), int(clock[3] or 0)
        meridiem = (clock[4] or "").lower()
        if meridiem == "p" and hour < 12:
            hour += 12
        elif meridiem == "a" and hour == 12:
            hour = 0
    offset = LOOSE_OFFSET.search(text, clock.end() if clock else date_end)
    tz: Any = zone
    if offset:
        sign, hours, minutes = offset.group(1, 2, 3) if offset[1] else offset.group(4, 5, 6)
        delta = timedelta(hours=int(hours), minutes=int(minutes or 0))
        if delta >= timedelta(hours=24) or int(minutes or 0) >= 60:
            # "+9999" is no UTC offset (RFC 5322 §3.3 allows up to ±23:59): read the time in
            # the configured zone instead, as for a date without an offset.
            notes.append(f"forwarded date {text[:60]!r} has an impossible UTC offset")
        else:
            tz = timezone(-delta if sign == "-" else delta) if delta else UTC
    try:
        value = datetime(year, month, day_of_month, hour, minute, second, tzinfo=tz)
    except ValueError:
        notes.append(f"forwarded date {text[:60]!r} not understood")
        return None
    if tz is zone:
        notes.append(f"forwarded date read in {zone.key}")
    return in_utc_range(value)


def in_utc_range(value: datetime | None) -> datetime | None:
    """The time, if it exists in UTC too: "31 Dec 9999 23:59 -1200" is past the last moment a
    datetime (and so the database column, which keeps UTC) can hold."""
    if value is None:
        return None
    try:
        value.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    return value


def _loose_day(text: str) -> tuple[int, int, int, int] | None:
    """(year, month, day, end of the date in ``text``)."""
    if match := ISO_DATE.search(text):
        return int(match[1]), int(match[2]), int(match[3]), match.end()
    if match := NUMERIC_DATE.search(text):
        return int(match[3]), int(match[2]), int(match[1]), match.end()
    if (match := DAY_MONTH_YEAR.search(text)) and (month := _month(match[2])):
        return int(match[3]), month, int(match[1]), match.end()
    if (match := MONTH_DAY_YEAR.search(text)) and (month := _month(match[1])):
        return int(match[3]), month, int(match[2]), match.end()
    return None


def _month(word: str) -> int | None:
    """A month from its English or Finnish name or abbreviation ("marrask.", "Nov")."""
    word = word.lower().rstrip(".")
    if len(word) < 3:
        return None
    found = {number for name, number in MONTHS.items() if name.startswith(word)}
    return found.pop() if len(found) == 1 else None


# -- strings the database can hold --------------------------------------------------------------


def _clean_strings(parsed: ParsedEmail) -> ParsedEmail:
    """No NUL (PostgreSQL text cannot hold it) and no lone surrogate (not encodable)."""
    if _clean(parsed):
        parsed.notes.append("NUL characters removed from the text")
    return parsed


_TEXT_FIELDS = (
    "message_id",
    "subject",
    "from_",
    "to",
    "cc",
    "in_reply_to",
    "references",
    "text",
    "forward_memo",
    "auto_reply",
    "notes",
)


def _clean(parsed: ParsedEmail) -> bool:
    found = False

    def clean(value: Any) -> Any:
        nonlocal found
        if isinstance(value, str):
            if "\x00" in value:
                found = True
                value = value.replace("\x00", "")
            return _SURROGATES.sub("\ufffd", value)
        if isinstance(value, tuple):
            return tuple(clean(v) for v in value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    for name in _TEXT_FIELDS:
        setattr(parsed, name, clean(getattr(parsed, name)))
    for attachment in parsed.attachments:
        if attachment.filename is not None:
            attachment.filename = _SURROGATES.sub("\ufffd", attachment.filename)
    for inner in [parsed.forwarded, *parsed.other_messages]:
        if inner is not None and _clean(inner):
            found = True
    return found


__all__ = [
    "Attachment",
    "ParseLimits",
    "ParsedEmail",
    "decode_text",
    "html_to_text",
    "parse_email",
    "parse_loose_date",
    "raw_hash",
    "scan_structure",
]
