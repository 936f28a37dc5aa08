"""Recordings by URL: the guard against server-side request forgery, the download over real
HTTP on loopback, and how the recording joins its call's event."""

from __future__ import annotations

import dataclasses
import ipaddress
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import Settings
from models.documents import EventDocument
from models.events import CrmEvent
from tasks.context import StageContext
from tasks.ingest.call import ingest_call
from tasks.telephony.recordings import (
    RecordingRefused,
    RecordingUnavailable,
    address_problem,
    download,
    store_recording,
    vet_url,
)

AUDIO = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 40


class Handler(BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 - shared by the test server's threads
    trickled: queue.Queue[str] = queue.Queue()

    def log_message(self, *_: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        Handler.requests.append(self.path)
        if self.path == "/rec.mp3":
            self.reply(200, AUDIO, {"Content-Type": "audio/mpeg"})
        elif self.path == "/moved":
            self.reply(302, b"", {"Location": "/rec.mp3"})
        elif self.path == "/to-private":
            self.reply(302, b"", {"Location": "http://10.0.0.1/rec.mp3"})
        elif self.path == "/loop":
            self.reply(302, b"", {"Location": "/loop"})
        elif self.path == "/big":
            self.reply(200, AUDIO * 10)
        elif self.path == "/big-unannounced":
            # No Content-Length: the body ends when the connection closes.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(AUDIO * 10)
            self.close_connection = True
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for _ in range(40):  # a byte now and then: never idle long enough to time out
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif self.path == "/slow-headers":
            # One header line now and then, each well within any per-read timeout; whether the
            # client stayed to read them all is reported in Handler.trickled.
            self.close_connection = True
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n")
                for index in range(30):
                    self.wfile.write(f"X-Trickle-{index}: x\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.3)
                self.wfile.write(b"Content-Length: 5\r\n\r\nhello")
                self.wfile.flush()
            except OSError:
                Handler.trickled.put("the client hung up")
                return
            Handler.trickled.put("every header line was sent")
        elif self.path == "/unavailable":
            self.reply(503, b"busy")
        else:
            self.reply(404, b"no")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def allowed(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, recording_fetch_allow=("127.0.0.0/8",), recording_fetch_timeout_s=2
    )


def resolver(*addresses: str) -> Any:
    return lambda host, port: list(addresses)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("100.64.0.1", "not a public"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_problem(address: str, problem: str | None) -> None:
    found = address_problem(ipaddress.ip_address(address))
    assert (found is None) if problem is None else (problem in (found or ""))


def test_the_guard(settings: Settings) -> None:
    public = resolver("93.184.216.34")
    assert vet_url("https://rec.example.fi/a.mp3?x=1", settings, public).path == "/a.mp3?x=1"
    for url, reason in (
        ("ftp://rec.example.fi/a.mp3", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("https://user:pw@rec.example.fi/a.mp3", "credentials"),
        ("http://:80/x", "no host"),
    ):
        with pytest.raises(RecordingRefused, match=reason):
            vet_url(url, settings, public)
    # Every address of the host counts: one private address among public ones is refused.
    with pytest.raises(RecordingRefused, match=r"10\.0\.0\.5 is a private address"):
        vet_url("https://rec.example.fi/a", settings, resolver("93.184.216.34", "10.0.0.5"))
    with pytest.raises(RecordingRefused, match="CRM_RECORDING_FETCH_ALLOW"):
        vet_url("http://localhost/a", settings, resolver("127.0.0.1", "::1"))
    # Allowed by network or by host name.
    by_network = dataclasses.replace(settings, recording_fetch_allow=("10.20.0.0/16",))
    assert vet_url("http://pbx.lan/a", by_network, resolver("10.20.1.2")).address == "10.20.1.2"
    with pytest.raises(RecordingRefused):
        vet_url("http://pbx.lan/a", by_network, resolver("10.30.1.2"))
    by_host = dataclasses.replace(settings, recording_fetch_allow=("pbx.lan",))
    assert vet_url("http://PBX.lan./a", by_host, resolver("10.30.1.2")).address == "10.30.1.2"


def test_a_recording_is_fetched_over_http_when_loopback_is_allow_listed(
    server: str, allowed: Settings
) -> None:
    fetched = download(f"{server}/rec.mp3", allowed)
    assert fetched.content == AUDIO
    assert fetched.media_type == "audio/mpeg"
    redirected = download(f"{server}/moved", allowed)
    assert redirected.content == AUDIO
    assert redirected.url.endswith("/rec.mp3")


def test_a_loopback_url_is_refused_without_the_allow_list(server: str, settings: Settings) -> None:
    before = len(Handler.requests)
    with pytest.raises(RecordingRefused, match=r"127\.0\.0\.1 is a loopback address"):
        download(f"{server}/rec.mp3", settings)
    assert len(Handler.requests) == before  # refused before any connection


def test_redirects_are_checked_and_bounded(server: str, allowed: Settings) -> None:
    with pytest.raises(RecordingRefused, match=r"10\.0\.0\.1 is a private address"):
        download(f"{server}/to-private", allowed)
    with pytest.raises(RecordingRefused, match="more than 3 redirects"):
        download(f"{server}/loop", allowed)


def test_size_cap_time_budget_and_answers(server: str, allowed: Settings) -> None:
    with pytest.raises(RecordingRefused, match="over the 20000-byte cap"):
        download(f"{server}/big", allowed, max_bytes=20_000)
    with pytest.raises(RecordingRefused, match="over the cap"):
        download(f"{server}/big-unannounced", allowed, max_bytes=20_000)
    with pytest.raises(RecordingUnavailable, match="timed out"):
        download(f"{server}/slow", allowed)  # a 2 s budget, however the bytes trickle
    with pytest.raises(RecordingUnavailable, match="timed out"):
        download(f"{server}/slow-headers", allowed)  # the headers count against it too
    # The fetch gave up while the headers still trickled in, not after the last of them.
    assert Handler.trickled.get(timeout=30) == "the client hung up"
    with pytest.raises(RecordingRefused, match="404"):
        download(f"{server}/missing.mp3", allowed)
    with pytest.raises(RecordingUnavailable, match="503"):
        download(f"{server}/unavailable", allowed)
    with pytest.raises(RecordingUnavailable):
        download("http://127.0.0.1:9/nothing-listens", allowed)


def call_with_recording(url: str) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-test",
        "call_id": "rec-1",
        "status": "completed",
        "direction": "inbound",
        "from": "040 123 4567",
        "recording": {"url": url},
    }


def recording_documents(db: Session) -> list[EventDocument]:
    event_id = db.scalar(select(CrmEvent.id).where(CrmEvent.source_id == "rec-1"))
    return list(
        db.scalars(
            select(EventDocument).where(
                EventDocument.event_id == event_id, EventDocument.role == "recording"
            )
        )
    )


def test_the_call_is_stored_first_and_the_recording_joins_it(
    world: Session, ctx: StageContext, server: str, allowed: Settings
) -> None:
    ctx = dataclasses.replace(ctx, settings=allowed)
    url = f"{server}/rec.mp3"
    result = ingest_call(world, ctx, call_with_recording(url))
    assert result.recordings_to_fetch == [{"event_id": result.event_id, "url": url}]
    [stub] = recording_documents(world)
    assert (stub.sha256, stub.filename, stub.note) == (
        None,
        "rec.mp3",
        f"link: {url} (being fetched)",
    )
    # A later update of the call does not ask for it again while it is being fetched.
    again = ingest_call(world, ctx, {**call_with_recording(url), "note": "Soitto nauhoitettiin."})
    assert again.recordings_to_fetch == []

    assert result.event_id is not None
    detail = store_recording(world, allowed, result.event_id, url, download(url, allowed))
    assert "stored as rec.mp3 (audio/mpeg)" in detail
    [document] = recording_documents(world)
    assert (document.size, document.media_type, document.note) == (len(AUDIO), "audio/mpeg", "")
    assert document.sha256 is not None
    event = world.get(CrmEvent, result.event_id)
    assert event is not None
    assert [r["state"] for r in event.details["recordings"]] == ["stored"]
    # Stored once: a second delivery of the fetch changes nothing.
    assert store_recording(world, allowed, result.event_id, url, download(url, allowed)) == (
        "already stored"
    )


def test_with_fetching_off_the_recording_stays_a_link(world: Session, ctx: StageContext) -> None:
    off = dataclasses.replace(
        ctx, settings=dataclasses.replace(ctx.settings, recording_fetch=False)
    )
    url = "https://pbx-hki.myyntitalo.fi/recordings/c-2026-11-27-0003.mp3"
    result = ingest_call(world, off, call_with_recording(url))
    assert result.recordings_to_fetch == []
    [stub] = recording_documents(world)
    assert stub.note == f"link: {url} (fetching is off)"
    assert stub.filename == "c-2026-11-27-0003.mp3"
