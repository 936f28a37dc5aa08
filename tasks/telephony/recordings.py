"""Recordings of calls given by URL: fetched by ``crm.ingest.recording`` after the call is stored.

The call's event is stored first, with the recording listed as a link; this task then downloads
the recording and attaches it as a document of the event. Fetching a URL that a telephony system
(or anyone able to post a call update) chose is a server-side request forgery risk, so:

- only ``http`` and ``https``; every address the host resolves to must be a public one
  (no loopback, private, link-local, multicast, reserved or unspecified address) unless the host
  or the address is allow-listed in ``CRM_RECORDING_FETCH_ALLOW``;
- the connection goes to the address that was checked (no second name lookup that could answer
  differently), and every redirect is checked the same way (at most three);
- no proxy from the environment, a size cap (``CRM_MAX_ATTACHMENT_BYTES``) enforced while
  reading, one time budget for the whole download (``CRM_RECORDING_FETCH_TIMEOUT_S``);
- transient failures (network, 5xx, 429) are retried with backoff a bounded number of times
  (``CRM_MAX_RETRIES``); a refused URL or a 4xx answer is recorded as rejected, never retried.

With ``CRM_RECORDING_FETCH=off`` nothing is fetched: the recording stays a link on the event.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from marshmallow import Schema, ValidationError, fields, validate
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from config.queues import RECORDING_TASK
from config.settings import Settings
from models.base import utcnow
from models.db import is_postgresql
from models.documents import EventDocument
from models.events import CrmEvent
from models.schemas.common import RAISE, MessageInvalid
from tasks.attach import attach, sanitise_filename
from tasks.errors import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

TASK_NAME = RECORDING_TASK
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Answers worth trying again later; any other 4xx means the URL will not work.
RETRY_STATUSES = frozenset({408, 425, 429})
CHUNK_BYTES = 64 * 1024
#: A fetch requested this long ago without an outcome is presumed lost (its worker died between
#: the commit and the enqueue) and is requested again by the call's next update.
REQUEST_AGAIN_AFTER = timedelta(minutes=10)
TWILIO_ACCOUNT = re.compile(r"/Accounts/(AC[0-9a-fA-F]{32})/")

Resolver = Callable[[str, int], list[str]]


class RecordingRefused(Exception):
    """The recording will not be fetched from this URL (guard, 4xx, size): never retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordingUnavailable(Exception):
    """The recording could not be fetched now (network, timeout, 5xx): worth a retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the guard ------------------------------------------------------------------------------------


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public one, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return address_problem(embedded)
        if address.teredo is not None:
            return address_problem(address.teredo[1])
    for label, flag in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a reserved", address.is_reserved),
        ("a private", address.is_private),
    ):
        if flag:
            return f"{address} is {label} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the host resolves to (the guard checks all of them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise RecordingUnavailable(f"name lookup of {host} failed for now: {exc}") from exc
        raise RecordingRefused(f"{host} does not resolve: {exc.strerror or exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str


def vet_url(url: str, settings: Settings, resolve: Resolver = system_resolver) -> Target:
    """Check a URL against the guard; the address to connect to, or :class:`RecordingRefused`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RecordingRefused(f"only http and https URLs are fetched, not {scheme or 'this'!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise RecordingRefused(f"malformed URL: {exc}") from exc
    if not host:
        raise RecordingRefused("the URL names no host")
    if parts.username or parts.password:
        raise RecordingRefused("credentials in the URL are not accepted")
    host = host.rstrip(".").lower()
    port = port or (443 if scheme == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise RecordingRefused(f"{host} has no address")
    allowed_hosts = {a for a in settings.recording_fetch_allow if not _is_network(a)}
    networks = [ipaddress.ip_network(a) for a in settings.recording_fetch_allow if _is_network(a)]
    if host not in allowed_hosts:
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            problem = address_problem(address)
            if problem and not any(address in network for network in networks):
                raise RecordingRefused(
                    f"{host} resolves to {problem}; allow it with CRM_RECORDING_FETCH_ALLOW"
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, scheme, host, port, path, addresses[0])


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry)
    except ValueError:
        return False
    return True


# -- the download ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Downloaded:
    content: bytes
    media_type: str | None
    url: str


class _DeadlineReads:
    """Every receive on the socket waits at most until the fetch's deadline.

    A socket timeout alone counts per receive: a server that sends one header line every few
    seconds would hold the pool process for as long as it likes. Here each receive gets what is
    left of the whole budget, for the TLS handshake, the status line, the headers and the body.
    """

    deadline: float

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out: CRM_RECORDING_FETCH_TIMEOUT_S is spent")
        return left

    def recv(self, *args: Any) -> bytes:
        self.settimeout(self._left())  # type: ignore[attr-defined]
        return super().recv(*args)  # type: ignore[misc]

    def recv_into(self, *args: Any) -> int:
        self.settimeout(self._left())  # type: ignore[attr-defined]
        return super().recv_into(*args)  # type: ignore[misc]

    def read(self, *args: Any) -> Any:  # ssl.SSLSocket reads through this
        self.settimeout(self._left())  # type: ignore[attr-defined]
        return super().read(*args)  # type: ignore[misc]


class _DeadlineSocket(_DeadlineReads, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineReads, ssl.SSLSocket):
    def do_handshake(self, *args: Any) -> None:
        self.settimeout(self._left())
        super().do_handshake(*args)


def _connection(target: Target, deadline: float) -> http.client.HTTPConnection:
    """A connection to the vetted address, whatever the name would resolve to now, whose every
    read ends by ``deadline`` (a monotonic time)."""
    timeout = _remaining(deadline)
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        context = ssl.create_default_context()
        # The TLS socket is a new object made from the plain one: it learns the deadline from
        # its class (a context of its own per connection).
        context.sslsocket_class = type(
            "DeadlineSSLSocket", (_DeadlineSSLSocket,), {"deadline": deadline}
        )
        connection = http.client.HTTPSConnection(
            target.host, target.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)

    def create_connection(
        _address: tuple[str, int], timeout: float, source: Any = None
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline = deadline
        try:
            sock.settimeout(timeout)
            if source:
                sock.bind(source)
            sock.connect((target.address, target.port))
        except BaseException:
            sock.close()
            raise
        return sock

    # http.client's own hook for opening the socket; TLS still checks the certificate against
    # the host name (server_hostname), only the address is pinned.
    connection._create_connection = create_connection  # type: ignore[attr-defined]
    return connection


def _headers(target: Target, settings: Settings) -> dict[str, str]:
    headers = {"User-Agent": "crm-events recording fetch", "Accept": "audio/*, */*;q=0.5"}
    # Twilio serves recordings to the account's own credentials (HTTP Basic); only over https
    # and only to Twilio's own host, never along a redirect to elsewhere.
    account = TWILIO_ACCOUNT.search(target.path)
    if (
        settings.twilio_auth_token
        and target.scheme == "https"
        and target.host == "api.twilio.com"
        and account
    ):
        pair = f"{account[1]}:{settings.twilio_auth_token}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    return headers


def download(
    url: str,
    settings: Settings,
    *,
    resolve: Resolver = system_resolver,
    max_bytes: int | None = None,
) -> Downloaded:
    """Fetch a recording within the guard, the size cap and the time budget."""
    cap = settings.max_attachment_bytes if max_bytes is None else max_bytes
    deadline = time.monotonic() + settings.recording_fetch_timeout_s
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        target = vet_url(current, settings, resolve)
        connection = _connection(target, deadline)
        try:
            connection.request("GET", target.path, headers=_headers(target, settings))
            response = connection.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise RecordingRefused(f"{response.status} redirect without a Location")
                current = urljoin(current, location)
                continue
            if response.status in RETRY_STATUSES or response.status >= 500:
                raise RecordingUnavailable(f"answered {response.status} {response.reason}")
            if response.status != 200:
                raise RecordingRefused(f"answered {response.status} {response.reason}")
            declared = response.getheader("Content-Length")
            if declared and declared.isascii() and declared.isdigit() and int(declared) > cap:
                raise RecordingRefused(f"{declared} bytes is over the {cap}-byte cap")
            content = _read_capped(connection, response, deadline, cap)
            return Downloaded(content, response.getheader("Content-Type"), current)
        except ssl.SSLCertVerificationError as exc:
            raise RecordingRefused(f"TLS certificate of {target.host} not valid: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise RecordingUnavailable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()
    raise RecordingRefused(f"more than {MAX_REDIRECTS} redirects")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RecordingUnavailable("timed out")
    return left


def _read_capped(
    connection: http.client.HTTPConnection,
    response: http.client.HTTPResponse,
    deadline: float,
    cap: int,
) -> bytes:
    """The body, at most ``cap`` bytes, within the time budget (a trickling server included)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if connection.sock is not None:
            connection.sock.settimeout(_remaining(deadline))
        # read1: returns what one receive brings, so the budget is checked as bytes trickle in.
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise RecordingRefused(f"more than {cap} bytes: over the cap")
        chunks.append(chunk)
        _remaining(deadline)


# -- bookkeeping on the event ---------------------------------------------------------------------


def recording_filename(recording: dict[str, Any], call_id: str) -> str:
    """The given filename, else the last part of the URL's path, else ``<call_id>-recording``."""
    if recording.get("filename"):
        return sanitise_filename(recording["filename"], f"{call_id}-recording")
    last = unquote(urlsplit(recording["url"]).path.rstrip("/").rpartition("/")[2])
    return sanitise_filename(last, f"{call_id}-recording")


def link_recordings(
    session: Session, settings: Settings, event: CrmEvent, recordings: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """List the call's recording URLs on the event and say which ones to fetch now.

    Runs under the event's row lock, in the call update's transaction. Each URL gets a document
    stub (role ``recording``) whose note carries the link until the recording itself is stored.
    """
    entries = {e["url"]: dict(e) for e in event.details.get("recordings", [])}
    used = {e["filename"] for e in entries.values()}
    requests: list[dict[str, Any]] = []
    now = utcnow()
    for recording in recordings:
        url = recording["url"]
        entry = entries.get(url)
        if entry is None:
            filename = recording_filename(recording, event.source_id)
            stem, n = filename, 2
            while filename in used:
                filename, n = f"{stem}-{n}", n + 1
            used.add(filename)
            entry = {
                "url": url,
                "filename": filename,
                "media_type": recording.get("media_type"),
                "state": "link",
                "requested_at": None,
                "note": "",
            }
            entries[url] = entry
            session.add(
                EventDocument(
                    event_id=event.id,
                    sha256=None,
                    filename=filename,
                    media_type=(recording.get("media_type") or "audio/mpeg").lower(),
                    size=0,
                    role="recording",
                    note="",
                )
            )
        if settings.recording_fetch and entry["state"] in ("link", "pending"):
            requested = entry.get("requested_at")
            if requested is None or datetime.fromisoformat(requested) < now - REQUEST_AGAIN_AFTER:
                entry["state"], entry["requested_at"] = "pending", now.isoformat()
                requests.append({"event_id": event.id, "url": url})
    session.flush()
    for entry in entries.values():
        _set_stub_note(session, event.id, entry, settings)
    if entries or "recordings" in event.details:  # a call without any: nothing to write
        event.details = {**event.details, "recordings": [entries[url] for url in sorted(entries)]}
    return requests


def _set_stub_note(session: Session, event_id: int, entry: dict[str, Any], settings: Any) -> None:
    if entry["state"] == "stored":
        return
    if entry["state"] == "pending":
        note = f"link: {entry['url']} (being fetched)"
    elif entry["state"] == "link":
        note = f"link: {entry['url']} (fetching is off)"
    else:
        note = f"link: {entry['url']} (not fetched: {entry['note']})"
    stub = session.scalar(
        select(EventDocument).where(
            EventDocument.event_id == event_id,
            EventDocument.role == "recording",
            EventDocument.filename == entry["filename"],
            EventDocument.sha256.is_(None),
        )
    )
    if stub is not None:
        stub.note = note[:4000]


def _locked_event(session: Session, event_id: int) -> CrmEvent | None:
    """The event under its row lock: call updates rewrite ``details`` under the same lock."""
    query = select(CrmEvent).where(CrmEvent.id == event_id)
    if is_postgresql(session):
        query = query.with_for_update()
    return session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()


def _entry(event: CrmEvent, url: str) -> dict[str, Any] | None:
    for entry in event.details.get("recordings", []):
        if entry.get("url") == url:
            return dict(entry)
    return None


def _save_entry(event: CrmEvent, entry: dict[str, Any]) -> None:
    others = [e for e in event.details.get("recordings", []) if e.get("url") != entry["url"]]
    recordings = sorted([*others, entry], key=lambda e: str(e["url"]))
    event.details = {**event.details, "recordings": recordings}


def mark_recording(
    session: Session, settings: Settings, event_id: int, url: str, state: str, note: str
) -> bool:
    """Record what became of a recording URL on its event; False when there is no such URL."""
    event = _locked_event(session, event_id)
    entry = _entry(event, url) if event else None
    if event is None or entry is None or entry["state"] == "stored":
        return False
    entry["state"], entry["note"] = state, note[:1000]
    _save_entry(event, entry)
    _set_stub_note(session, event.id, entry, settings)
    return True


def store_recording(
    session: Session, settings: Settings, event_id: int, url: str, downloaded: Downloaded
) -> str:
    """Attach a downloaded recording to its event in place of the link stub."""
    event = _locked_event(session, event_id)
    entry = _entry(event, url) if event else None
    if event is None or entry is None:
        return "the call's event or recording entry is gone"
    if entry["state"] == "stored":
        return "already stored"
    media_type = (downloaded.media_type or "").split(";", 1)[0].strip()
    stored = attach(
        session,
        settings,
        event.id,
        content=downloaded.content,
        filename=entry["filename"],
        declared_type=media_type or entry.get("media_type"),
        role="recording",
    )
    session.execute(
        delete(EventDocument).where(
            EventDocument.event_id == event.id,
            EventDocument.role == "recording",
            EventDocument.filename == entry["filename"],
            EventDocument.sha256.is_(None),
        )
    )
    entry.update(state="stored", note=f"fetched from {url}", sha256=stored.sha256)
    _save_entry(event, entry)
    return f"{stored.size} bytes stored as {stored.filename} ({stored.media_type})"


#: Retried with backoff, a bounded number of times, then recorded as failed.
RETRIABLE: tuple[type[BaseException], ...] = (RecordingUnavailable, *TRANSIENT_ERRORS)


class RecordingRequestSchema(Schema):
    """The task's one argument: ``{"event_id": int, "url": str}``."""

    class Meta:
        unknown = RAISE

    event_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    url = fields.String(required=True, validate=validate.Length(min=1, max=4000))


def load_request(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise MessageInvalid(
            f"a recording request must be a JSON object, got {type(payload).__name__}"
        )
    try:
        loaded: dict[str, Any] = RecordingRequestSchema().load(payload)
    except ValidationError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise MessageInvalid(f"invalid recording request: {errors}", errors) from exc
    return loaded


def pending_entry(session: Session, event_id: int, url: str) -> dict[str, Any] | None:
    """The URL's entry on its event while it still needs fetching; None once stored or gone."""
    event = session.get(CrmEvent, event_id)
    entry = _entry(event, url) if event else None
    return None if entry is None or entry["state"] == "stored" else entry
