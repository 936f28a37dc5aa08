"""Hypothesis strategies for raw email bytes: MIME messages of random structure, and noise.

Built as bytes, not with the standard library's generator, so that the messages can be as
broken as real mail is: malformed and 8-bit headers, charsets that are unknown or lie, transfer
encodings whose payload does not decode, boundaries that do not match, filenames that are paths
or carry NULs, RFC 2231 and RFC 2047 encodings, attached and inline forwarded messages.
"""

from __future__ import annotations

import base64
import quopri
from typing import Any

from hypothesis import strategies as st

from tests.fuzz.strategies import EXAMPLE_WORLD, Names

CHARSETS = [
    "utf-8",
    "UTF-8",
    "iso-8859-1",
    "iso-8859-15",
    "windows-1252",
    "us-ascii",
    "koi8-r",
    "utf-16",
    "utf-32",
    "utf-7",
    "shift_jis",
    "iso-2022-jp",
    "gb2312",
    "x-unknown",
    "",
    "utf-8\x00",
    "unicode-1-1-utf-7",
    "rot13",
    "base64",
    "zlib",
    "hex",
    "punycode",
    "idna",
    "unicode_escape",
    "raw_unicode_escape",
    "undefined",
    "utf8'",
    '"utf-8"',
    "../../utf-8",
    "a" * 300,
]

ENCODINGS = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "bogus", ""]

FILENAMES = [
    "tarjous.pdf",
    "../../etc/passwd",
    "..",
    ".",
    "...",
    "/etc/shadow",
    "C:\\Windows\\evil.exe",
    "..\\..\\boot.ini",
    "a\x00b.txt",
    "\x00",
    ".hidden",
    "con",
    "x" * 400 + ".pdf",
    "raportti 2026 – ÄÖ.xlsx",
    "😀.png",
    "name\r\nContent-Type: text/html",
    "",
    " ",
]

FORWARD_MARKERS = [
    "---------- Forwarded message ---------",
    "-------- Forwarded Message --------",
    "-----Original Message-----",
    "-----Alkuperäinen viesti-----",
    "---------- Välitetty viesti ----------",
    "Begin forwarded message:",
    "Välitetty viesti alkaa:",
    "________________________________",
]

FORWARD_HEADER_LINES = [
    "From: Matti Virtanen <matti.virtanen@pohjolankone.fi>",
    "Lähettäjä: Matti Virtanen <matti.virtanen@pohjolankone.fi>",
    "Sent: Friday, November 20, 2026 8:41 AM",
    "Lähetetty: perjantai 20. marraskuuta 2026 klo 8.41",
    "Date: 20.11.2026 klo 8.41 +0200",
    "Päivämäärä: 31.02.2026 25.61",
    "Date: Fri, 20 Nov 2026 08:41:03 +9999",
    "To: crm@myyntitalo.fi",
    "Vastaanottaja: Anna <anna.lahtinen@myyntitalo.fi>",
    "Subject: Tarjouspyyntö",
    "Aihe: =?utf-8?q?Tarjouspyynt=C3=B6?=",
    "From:",
    "From: <>",
    "From: " + "a" * 5000,
]

DATES = [
    "Fri, 20 Nov 2026 09:05:00 +0200",
    "Fri, 20 Nov 2026 09:05:00 +9999",
    "Fri, 31 Feb 2026 09:05:00 +0200",
    "Mon, 1 Jan 0001 00:00:00 +1400",
    "Fri, 31 Dec 9999 23:59:59 -1200",
    "20.11.2026 9.05",
    "",
    "tomorrow",
    "Fri, 20 Nov 2026 09:05:00 GMT+2",
]


def ascii_words(max_size: int = 30) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='\\"'),
        max_size=max_size,
    )


def encoded_word(text: str, charset: str, method: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    if method == "B":
        payload = base64.b64encode(data).decode("ascii")
    else:
        payload = quopri.encodestring(data, header=True).decode("ascii").replace("\n", "")
    return f"=?{charset}?{method}?{payload}?="


@st.composite
def header_text(draw: Any) -> str:
    """A header value: plain, unicode, RFC 2047 encoded (possibly lying), or broken."""
    text = draw(st.text(max_size=40))
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return text
    if choice == 1:
        return encoded_word(text, draw(st.sampled_from(CHARSETS[:16])), draw(st.sampled_from("BQ")))
    if choice == 2:
        return "=?utf-8?B?" + draw(st.sampled_from(["!!!", "Zm9v", "Zm9", "", "===="])) + "?="
    if choice == 3:
        return draw(ascii_words())
    if choice == 4:
        return "x" * draw(st.sampled_from([999, 5000, 70_000]))
    if choice == 5:
        return draw(st.sampled_from(["\r\n\tfolded", "a\r\n", "\x00", "ä\udcff"]))
    return text + " " + encoded_word(text, "utf-8", "Q")


def address(names: Names) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(names.addresses),
        st.emails(),
        st.builds(lambda n, a: f'"{n}" <{a}>', ascii_words(20), st.sampled_from(names.addresses)),
        st.builds(lambda n, a: f"{n} <{a}>", header_text(), st.emails()),
        st.sampled_from(["<>", "undisclosed-recipients:;", "@", "a@", "<a@b", "a@b>, , ,"]),
    )


@st.composite
def filename_params(draw: Any) -> str:
    """``; filename=...`` in one of the ways mail clients (and attackers) write it."""
    name = draw(st.sampled_from(FILENAMES) | st.text(max_size=30))
    safe = name.encode("utf-8", "surrogatepass")
    style = draw(st.integers(0, 5))
    if style == 0:
        return f'; filename="{name}"'
    if style == 1:
        quoted = "".join(f"%{byte:02X}" for byte in safe)
        charset = draw(st.sampled_from(["utf-8", "iso-8859-1", "x-bogus", ""]))
        return f"; filename*={charset}''{quoted}"
    if style == 2:
        half = len(name) // 2
        return f'; filename*0="{name[:half]}"; filename*1="{name[half:]}"'
    if style == 3:
        return f'; filename="{encoded_word(name, "utf-8", draw(st.sampled_from("BQ")))}"'
    if style == 4:
        return f"; name={name}"
    return "; filename*=utf-8''%ZZ%00%2e%2e%2f"


def _body_text(draw: Any) -> str:
    parts = [draw(st.text(max_size=80))]
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(FORWARD_MARKERS)))
        parts += draw(st.lists(st.sampled_from(FORWARD_HEADER_LINES), max_size=5))
        parts.append("")
        parts.append(draw(st.text(max_size=80)))
    if draw(st.booleans()):
        parts.append("asiakasnumero: " + draw(st.sampled_from(["10001", "10002", "99999", "0"])))
    return "\n".join(parts)


def _encode_body(draw: Any, data: bytes, encoding: str) -> bytes:
    broken = draw(st.integers(0, 3)) == 0
    if encoding == "base64":
        encoded = base64.encodebytes(data)
        if broken:
            encoded = encoded[: max(0, len(encoded) - 3)] + draw(
                st.sampled_from([b"!!", b"=", b"\x00", b"\xff\xfe", b"===="])
            )
        return encoded
    if encoding == "quoted-printable":
        encoded = quopri.encodestring(data)
        if broken:
            encoded += draw(st.sampled_from([b"=ZZ", b"=", b"=\r", b"=0"]))
        return encoded
    if encoding == "x-uuencode":
        return b"begin 644 x.bin\n" + draw(st.binary(max_size=60)) + b"\nend\n"
    return data


@st.composite
def mime_part(draw: Any, depth: int, names: Names) -> bytes:
    """One MIME entity (headers, blank line, body); multiparts and rfc822 parts recurse."""
    kinds = ["text", "text", "html", "binary"]
    if depth < 3:
        kinds += ["multipart", "multipart", "rfc822"]
    kind = draw(st.sampled_from(kinds))
    headers: list[str] = []
    body: bytes
    if kind == "multipart":
        subtype = draw(
            st.sampled_from(["mixed", "alternative", "related", "digest", "report", "signed"])
        )
        boundary = draw(st.sampled_from(["b1", "==x==", "", "a" * 80, "with space", "\x00"]))
        boundary = f"{boundary}{depth}" if boundary else ""
        params = f'; boundary="{boundary}"' if draw(st.integers(0, 5)) else ""
        if subtype == "report":
            params += "; report-type=" + draw(
                st.sampled_from(["delivery-status", "disposition-notification", "other"])
            )
        headers.append(f"Content-Type: multipart/{subtype}{params}")
        children = draw(st.lists(mime_part(depth + 1, names), max_size=4))
        delimiter = boundary
        if draw(st.integers(0, 6)) == 0:
            delimiter = "lying-" + boundary  # parts under a boundary the header does not name
        chunks = [draw(st.sampled_from([b"", b"preamble\r\n"]))]
        for child in children:
            chunks.append(f"--{delimiter}\r\n".encode("utf-8", "surrogateescape") + child)
        if draw(st.integers(0, 4)):
            chunks.append(f"--{delimiter}--\r\n".encode("utf-8", "surrogateescape"))
        body = b"\r\n".join(chunks)
    elif kind == "rfc822":
        headers.append("Content-Type: message/rfc822")
        if draw(st.booleans()):
            headers.append("Content-Disposition: attachment" + draw(filename_params()))
        body = draw(raw_message(names, depth + 1))
    else:
        charset = draw(st.sampled_from(CHARSETS))
        encoding = draw(st.sampled_from(ENCODINGS))
        if kind == "binary":
            media = draw(st.sampled_from(["application/pdf", "image/png", "text/html", "x/y"]))
            data = draw(st.binary(max_size=200))
        else:
            media = "text/html" if kind == "html" else "text/plain"
            text = _body_text(draw)
            if kind == "html":
                text = f"<html><body><p>{text}</p><script>alert(1)</script><img src=x></body>"
            lie = draw(st.sampled_from(["utf-8", "iso-8859-1", "utf-16", "cp1252"]))
            data = text.encode(lie, "surrogatepass" if lie.startswith("utf") else "replace")
        content_type = f"Content-Type: {media}"
        if draw(st.booleans()):
            content_type += f'; charset="{charset}"'
        if kind == "binary" or draw(st.integers(0, 3)) == 0:
            content_type += draw(filename_params()).replace("filename", "name", 1)
        headers.append(content_type)
        if encoding:
            headers.append(f"Content-Transfer-Encoding: {encoding}")
        if kind == "binary" or draw(st.integers(0, 3)) == 0:
            disposition = draw(st.sampled_from(["attachment", "inline", "bogus", ""]))
            headers.append(f"Content-Disposition: {disposition}" + draw(filename_params()))
        body = _encode_body(draw, data, encoding)
    for _ in range(draw(st.integers(0, 2))):
        headers.insert(draw(st.integers(0, len(headers))), draw(odd_header()))
    head = "\r\n".join(headers).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + body


@st.composite
def odd_header(draw: Any) -> str:
    """A header line that is wrong in some way."""
    return draw(
        st.sampled_from(
            [
                "X-No-Colon-Here",
                ": no name",
                "Bad Name: value",
                "Content-Type: text/plain; charset",
                "Content-Type: ;;;===",
                "Content-Type: text/",
                "Content-Type: multipart/mixed",
                "Content-Transfer-Encoding: base64; x",
                "Content-Disposition: attachment; filename*0*=utf-8''%C3; filename*1*=%A4",
                "MIME-Version: 9.9",
                "Ä-Header: ä",
                "X-Long: " + "y" * 3000,
                "\tcontinuation without a header",
                "Auto-Submitted: auto-replied",
                "Precedence: bulk",
                "X-Autoreply: yes",
            ]
        )
        | st.builds(
            lambda n, v: f"{n}: {v}", ascii_words(12).filter(lambda s: ":" not in s), header_text()
        )
    )


@st.composite
def raw_message(draw: Any, names: Names = EXAMPLE_WORLD, depth: int = 0) -> bytes:
    """A whole email: top-level headers (random, malformed, missing), then one MIME entity."""
    headers: list[str] = []
    optional = {
        "From": address(names),
        "To": address(names),
        "Cc": st.lists(address(names), max_size=3).map(", ".join),
        "Subject": header_text(),
        "Date": st.sampled_from(DATES),
        "Message-ID": st.sampled_from(["<a@b>", "", "<>", "no-brackets", "<" + "m" * 600 + ">"])
        | st.uuids().map(lambda u: f"<{u}@fuzz.example>"),
        "In-Reply-To": st.sampled_from(["<a@b>", "<<>>", "x" * 500]),
        "References": st.lists(st.uuids().map(lambda u: f"<{u}@r>"), max_size=4).map(" ".join),
        "MIME-Version": st.just("1.0"),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        headers.append(f"{name}: {draw(optional[name])}")
    if depth == 0:
        # Most messages get a fresh Message-ID, so that they are new events, not duplicates.
        headers.append(f"Message-ID: <{draw(st.uuids())}@fuzz.example>")
    entity = draw(mime_part(depth, names))
    head = "\r\n".join(headers).encode("utf-8", "surrogateescape")
    message = head + b"\r\n" + entity if head else entity
    line_end = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\r"]))
    return message.replace(b"\r\n", line_end) if line_end != b"\r\n" else message


@st.composite
def flipped(draw: Any, raw: st.SearchStrategy[bytes]) -> bytes:
    """A message with a few of its bytes replaced (a broken transfer, a bad relay)."""
    data = bytearray(draw(raw))
    for _ in range(draw(st.integers(1, 5))):
        if not data:
            break
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def raw_emails(names: Names = EXAMPLE_WORLD) -> st.SearchStrategy[bytes]:
    """Raw email bytes: structured messages, damaged ones, and plain noise."""
    structured = raw_message(names)
    return st.one_of(structured, structured, flipped(structured), st.binary(max_size=400))
