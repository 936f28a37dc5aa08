"""Parse raw RFC 5322 bytes into what the email stage needs, defensively.

Nothing here raises on malformed input: whatever cannot be read is noted in ``notes`` and the
rest is still returned. Caps on parts and nesting depth bound the work on hostile messages.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

MAX_PARTS = 500
MAX_DEPTH = 20

AUTO_SUBMITTED_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponder")
BULK_PRECEDENCE = {"bulk", "junk", "auto_reply", "list"}

FORWARD_MARKERS = re.compile(
    r"^\s*(?:"
    r"-{2,}\s*(?:forwarded message|original message|alkuperäinen viesti|välitetty viesti"
    r"|ursprungligt meddelande|vidarebefordrat meddelande)\s*-{2,}"
    r"|begin forwarded message:|aloita välitetty viesti:|välitetty viesti:"
    r")\s*$",
    re.IGNORECASE | re.MULTILINE,
)
#: An Outlook block without a marker line: "From:"/"Lähettäjä:" followed by a sent line.
OUTLOOK_BLOCK = re.compile(
    r"^(?:From|Lähettäjä|Från):\s.*\n(?:.*\n){0,3}?(?:Sent|Lähetetty|Skickat|Date|Päivämäärä):\s",
    re.IGNORECASE | re.MULTILINE,
)
HEADER_NAMES = {
    "from": "from",
    "lähettäjä": "from",
    "från": "from",
    "sent": "date",
    "date": "date",
    "lähetetty": "date",
    "päivämäärä": "date",
    "päiväys": "date",
    "skickat": "date",
    "to": "to",
    "vastaanottaja": "to",
    "till": "to",
    "cc": "cc",
    "kopio": "cc",
    "subject": "subject",
    "aihe": "subject",
    "ämne": "subject",
}
FI_MONTHS = {
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
}
FI_DATE = re.compile(
    r"(\d{1,2})\.\s*([a-zäö]+)\s+(\d{4})(?:\s+(?:klo\s+)?(\d{1,2})[.:](\d{2}))?", re.IGNORECASE
)
EN_FORMATS = (
    "%A, %B %d, %Y %I:%M %p",
    "%A, %B %d, %Y %H:%M",
    "%B %d, %Y at %I:%M:%S %p",
    "%B %d, %Y at %I:%M %p",
    "%d %B %Y at %H:%M",
    "%a, %b %d, %Y at %I:%M %p",
    "%d.%m.%Y %H.%M",
    "%d.%m.%Y %H:%M",
)


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
    auto_reply: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def thread_root(self) -> str | None:
        if self.references:
            return self.references[0]
        return self.in_reply_to or self.message_id


def raw_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def parse_email(raw: bytes, zone: ZoneInfo) -> ParsedEmail:
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception as exc:  # the parser is lenient; this is the last line of defence
        return ParsedEmail(notes=[f"unparseable message: {type(exc).__name__}: {exc}"])
    counter = [0]
    return _without_nul(_parse_message(message, zone, depth=0, counter=counter))


#: The parsed strings the stage stores or looks up; the database's text cannot hold NUL.
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


def _without_nul(parsed: ParsedEmail) -> ParsedEmail:
    """Drop NUL characters (a stray byte, a UTF-16 body labelled UTF-8) and note it."""
    if _strip_nul(parsed):
        parsed.notes.append("NUL characters removed from the text")
    return parsed


def _strip_nul(parsed: ParsedEmail) -> bool:
    found = False

    def clean(value: Any) -> Any:
        nonlocal found
        if isinstance(value, str) and "\x00" in value:
            found = True
            return value.replace("\x00", "")
        if isinstance(value, tuple):
            return tuple(clean(v) for v in value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    for name in _TEXT_FIELDS:
        setattr(parsed, name, clean(getattr(parsed, name)))
    if parsed.forwarded is not None and _strip_nul(parsed.forwarded):
        found = True
    return found


def _header(message: Message, name: str, notes: list[str]) -> str:
    try:
        value = message.get(name)
    except Exception as exc:
        notes.append(f"header {name} unreadable: {type(exc).__name__}")
        return ""
    return "" if value is None else str(value).strip()


def _addresses(message: Message, name: str, notes: list[str]) -> list[tuple[str, str]]:
    try:
        values = message.get_all(name) or []
        pairs = email.utils.getaddresses([str(v) for v in values])
    except Exception as exc:
        notes.append(f"header {name} unreadable: {type(exc).__name__}")
        return []
    return [(n, a.strip().lower()) for n, a in pairs if "@" in a]


def _msgid(value: str) -> str | None:
    value = value.strip()
    found = re.findall(r"<([^<>\s]+)>", value)
    if found:
        return found[0]
    return value or None


def _parse_message(message: Message, zone: ZoneInfo, depth: int, counter: list[int]) -> ParsedEmail:
    parsed = ParsedEmail()
    notes = parsed.notes
    parsed.message_id = _msgid(_header(message, "Message-ID", notes))
    parsed.subject = " ".join(_header(message, "Subject", notes).split())
    senders = _addresses(message, "From", notes)
    parsed.from_ = senders[0] if senders else None
    parsed.to = _addresses(message, "To", notes)
    parsed.cc = _addresses(message, "Cc", notes)
    parsed.in_reply_to = _msgid(_header(message, "In-Reply-To", notes))
    parsed.references = re.findall(r"<([^<>\s]+)>", _header(message, "References", notes))
    date_text = _header(message, "Date", notes)
    if date_text:
        try:
            parsed.date = email.utils.parsedate_to_datetime(date_text)
            if parsed.date.tzinfo is None:
                parsed.date = parsed.date.replace(tzinfo=zone)
                notes.append(f"Date had no offset; read as {zone.key}")
        except (TypeError, ValueError, IndexError):
            notes.append(f"unreadable Date header {date_text[:80]!r}")
    parsed.auto_reply = _auto_reply(message, notes)

    body_part = None
    try:
        body_part = message.get_body(preferencelist=("plain", "html"))  # type: ignore[attr-defined]
    except Exception as exc:
        notes.append(f"body not found: {type(exc).__name__}")
    if body_part is not None:
        text = _text_of(body_part, notes)
        if body_part.get_content_subtype() == "html":
            text = html_to_text(text)
            notes.append("HTML-only body converted to text")
        parsed.text = text.strip()

    for part in _leaf_parts(message, depth, counter, notes):
        if part is body_part:
            continue
        if part.get_content_type() == "message/rfc822":
            inner = _inner_message(part)
            if inner is None:
                notes.append("an attached message could not be read")
                continue
            original = _parse_message(inner, zone, depth + 1, counter)
            if parsed.forwarded is None:
                parsed.forwarded = original
                parsed.forward_memo = parsed.text
            else:
                parsed.attachments.extend(original.attachments)
            continue
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_maintype() == "text" and not _is_attachment(part):
            continue  # alternative bodies (the HTML twin of the text we kept)
        try:
            content = part.get_payload(decode=True) or b""
        except Exception as exc:
            notes.append(f"attachment unreadable: {type(exc).__name__}")
            continue
        if not isinstance(content, bytes):  # never from the parser; never a crash either
            notes.append("attachment with an unexpected payload skipped")
            continue
        try:
            filename = part.get_filename()
        except Exception:
            filename = None
            notes.append("attachment filename unreadable")
        parsed.attachments.append(Attachment(filename, part.get_content_type(), content))

    if parsed.forwarded is None and parsed.text:
        _inline_forward(parsed, zone)
    return parsed


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment" or bool(part.get_filename())
    except Exception:
        return False


def _inner_message(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, Message):
        return payload
    try:
        raw = part.get_payload(decode=True)
    except Exception:
        return None
    # Not a Message (handled above): the decoded payload is bytes, or None for a multipart.
    if isinstance(raw, bytes) and raw:
        return email.message_from_bytes(raw, policy=email.policy.default)
    return None


def _leaf_parts(
    message: Message, depth: int, counter: list[int], notes: list[str]
) -> list[Message]:
    """The parts below ``message``, depth-first, not descending into attached messages."""
    if depth > MAX_DEPTH:
        notes.append(f"nesting deeper than {MAX_DEPTH}: inner parts ignored")
        return []
    if not message.is_multipart() or message.get_content_type() == "message/rfc822":
        return [message] if depth else []
    result: list[Message] = []
    payload = message.get_payload()
    if not isinstance(payload, list):
        return result
    for part in payload:
        if not isinstance(part, Message):  # the parser only puts messages here
            continue
        counter[0] += 1
        if counter[0] > MAX_PARTS:
            notes.append(f"more than {MAX_PARTS} MIME parts: the rest ignored")
            break
        if part.get_content_type() == "message/rfc822":
            result.append(part)
        elif part.is_multipart():
            result.extend(_leaf_parts(part, depth + 1, counter, notes))
        else:
            result.append(part)
    return result


def _text_of(part: Message, notes: list[str]) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content.replace("\r\n", "\n")
    except (LookupError, UnicodeError, AssertionError, ValueError) as exc:
        notes.append(
            f"text with charset {part.get_content_charset()!r} unreadable"
            f" ({type(exc).__name__}); decoded as UTF-8 with replacements"
        )
    payload = part.get_payload(decode=True) or b""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
    return text.replace("\r\n", "\n")


def _auto_reply(message: Message, notes: list[str]) -> str | None:
    auto = _header(message, "Auto-Submitted", notes).lower()
    if auto and auto != "no":
        return f"auto-reply: Auto-Submitted: {auto}"
    for name in AUTO_SUBMITTED_HEADERS:
        if _header(message, name, notes):
            return f"auto-reply: {name} header present"
    precedence = _header(message, "Precedence", notes).lower()
    if precedence in BULK_PRECEDENCE:
        return f"auto-reply or bulk mail: Precedence: {precedence}"
    return None


def _inline_forward(parsed: ParsedEmail, zone: ZoneInfo) -> None:
    """Find an inline forward ("-----Alkuperäinen viesti-----", Outlook blocks, …)."""
    text = parsed.text
    marker = FORWARD_MARKERS.search(text)
    if marker:
        memo, rest = text[: marker.start()], text[marker.end() :]
    else:
        block = OUTLOOK_BLOCK.search(text)
        if not block:
            return
        memo, rest = text[: block.start()], text[block.start() :]
    headers: dict[str, str] = {}
    lines = rest.lstrip("\n").split("\n")
    consumed = 0
    for line in lines:
        stripped = line.strip().lstrip(">").strip()
        if not stripped:
            if headers:
                consumed += 1
                break
            consumed += 1
            continue
        key, sep, value = stripped.partition(":")
        name = HEADER_NAMES.get(key.strip().lower().strip("*"))
        if not sep or name is None:
            break
        headers.setdefault(name, value.strip().strip("*").strip())
        consumed += 1
    if "from" not in headers:
        return
    original = ParsedEmail()
    sender = email.utils.getaddresses([headers["from"]])
    original.from_ = (
        (sender[0][0], sender[0][1].lower()) if sender and "@" in sender[0][1] else None
    )
    for name in ("to", "cc"):
        if name in headers:
            pairs = email.utils.getaddresses([headers[name]])
            setattr(original, name, [(n, a.lower()) for n, a in pairs if "@" in a])
    original.subject = headers.get("subject", "")
    original.date = parse_loose_date(headers.get("date", ""), zone, original.notes)
    original.text = "\n".join(lines[consumed:]).strip()
    parsed.forwarded = original
    parsed.forward_memo = memo.strip()


def parse_loose_date(text: str, zone: ZoneInfo, notes: list[str]) -> datetime | None:
    """Dates as mail clients print them in forward blocks, Finnish and English."""
    text = text.strip()
    if not text:
        return None
    try:
        value = email.utils.parsedate_to_datetime(text)
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone)
        return value
    except (TypeError, ValueError, IndexError):
        pass
    if match := FI_DATE.search(text):
        month = FI_MONTHS.get(match[2].lower())
        if month:
            hour, minute = int(match[4] or 0), int(match[5] or 0)
            notes.append(f"forwarded date read in {zone.key}")
            return datetime(int(match[3]), month, int(match[1]), hour, minute, tzinfo=zone)
    for fmt in EN_FORMATS:
        try:
            value = datetime.strptime(text, fmt)
        except ValueError:
            continue
        notes.append(f"forwarded date read in {zone.key}")
        return value.replace(tzinfo=zone)
    notes.append(f"forwarded date {text[:60]!r} not understood")
    return None


class _TextExtractor(HTMLParser):
    BLOCK: ClassVar[set[str]] = {
        "p",
        "div",
        "br",
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
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "style", "head"}:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"script", "style", "head"} and self._skip:
            self._skip -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Readable text from HTML; the HTML itself is never stored for display."""
    extractor = _TextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
    except Exception:
        return re.sub(r"<[^>]*>", " ", html)
    text = "".join(extractor.parts)
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


__all__ = ["Attachment", "EmailMessage", "ParsedEmail", "parse_email", "raw_hash"]
