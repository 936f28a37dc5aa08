"""The HTTP service over real HTTP on loopback, with the session's worker and PostgreSQL.

Its world is its own (a customer, a seller and a manager no other test names), so that what it
stores moves no other test's counts.
"""

from __future__ import annotations

import contextlib
import email.policy
import json
import signal
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.http_service import HttpService, start_service, stop_service
from tests.integration.conftest import LiveSystem
from tests.processes import wait_for_log
from workers.publish import wait_for

pytestmark = pytest.mark.integration

SELLER = "http-seller"
CUSTOMER = "95001"
#: A request must arrive whole within this many seconds (short here, for the trickle test).
DEADLINE_S = 3


def parties() -> list[dict[str, Any]]:
    party = {"schema": "crm.party/1", "source_system": "erp"}
    return [
        {**party, "kind": "staff", "username": "http-manager", "name": "Helka Hallinto",
         "email": "helka@myyntitalo.fi", "role": "manager"},
        {**party, "kind": "staff", "username": SELLER, "name": "Heikki Myyjä",
         "email": "heikki.myyja@myyntitalo.fi", "role": "seller", "manager": "http-manager"},
        {**party, "kind": "customer", "customer_number": CUSTOMER, "name": "Verkkotesti Oy",
         "email_domains": ["verkkotesti.fi"], "seller": SELLER},
        {**party, "kind": "contact", "customer_number": CUSTOMER, "name": "Vilma Verkko",
         "email": "vilma@verkkotesti.fi", "phones": ["+358 40 955 0001"]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(live: LiveSystem) -> LiveSystem:
    assert {d.outcome for d in live.publish("party", parties())} == {"done"}
    return live


@pytest.fixture(scope="module")
def tokens(world: LiveSystem) -> dict[str, str]:
    made = {}
    for scope in ("ingest", "read", "admin"):
        name = f"http-{scope}-{uuid.uuid4().hex[:6]}"
        done = world.cli("token", "create", name, "--scope", scope, "--json")
        assert done.returncode == 0, done.stderr
        made[scope] = json.loads(done.stdout)["token"]
        made[f"{scope}-name"] = name
    revoked = f"http-revoked-{uuid.uuid4().hex[:6]}"
    done = world.cli("token", "create", revoked, "--scope", "admin", "--json")
    made["revoked"] = json.loads(done.stdout)["token"]
    assert world.cli("token", "revoke", revoked).returncode == 0
    listed = json.loads(world.cli("token", "list", "--json").stdout)
    assert all("token" not in row for row in listed)  # never shown again
    assert any(row["name"] == revoked and row["revoked_at"] for row in listed)
    return made


@pytest.fixture(scope="module")
def service(world: LiveSystem) -> Iterator[HttpService]:
    env = {**world.env, "CRM_HTTP_REQUEST_DEADLINE_S": str(DEADLINE_S)}
    running = start_service(env, world.settings.data_dir / "http-service.log")
    yield running
    stop_service(running)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(service: HttpService, path: str, document: Any, token: str) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **auth(token)}
    return service.request("POST", path, json.dumps(document).encode(), headers)


def visit(started: datetime, subject: str = "Verkkokäynti") -> dict[str, Any]:
    return {
        "schema": "crm.visit/1",
        "source_system": "http-test",
        "visit_id": f"hv-{uuid.uuid4().hex[:10]}",
        "seller": SELLER,
        "customer_number": CUSTOMER,
        "started_at": started.isoformat(),
        "subject": subject,
        "memo": "Esittely <b>ilman</b> skriptejä",
    }


def call(number: int, occurred: datetime, source: str) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": source,
        "call_id": f"{source}-{number}",
        "status": "completed",
        "direction": "inbound",
        "from": "+358 40 955 0001",
        "agent": SELLER,
        "started_at": occurred.isoformat(),
        "duration_s": 60,
    }


def outcomes(live: LiveSystem, task_ids: list[str]) -> list[str]:
    done = wait_for(live.sessions, task_ids, 60)
    assert set(done) == set(task_ids), f"not processed; worker log:\n{live.tail()}"
    return [done[t].outcome for t in task_ids]


# -- access ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/calls", {"ingest", "admin"}),
        ("POST", "/v1/visits", {"ingest", "admin"}),
        ("GET", "/v1/events", {"read", "admin"}),
        ("GET", f"/v1/customers/{CUSTOMER}/history", {"read", "admin"}),
        ("GET", f"/v1/sellers/{SELLER}/view", {"read", "admin"}),
        ("GET", "/v1/targets/progress", {"read", "admin"}),
    ],
)
def test_each_scope_may_do_what_it_names_and_nothing_else(
    service: HttpService, tokens: dict[str, str], method: str, path: str, allowed: set[str]
) -> None:
    body = b"[]" if method == "POST" else b""
    headers = {"Content-Type": "application/json"}
    status, answer = service.request(method, path, body, headers)
    assert status == 401 and "token" in answer["error"]
    status, _ = service.request(method, path, body, {**headers, **auth(tokens["revoked"])})
    assert status == 401
    status, _ = service.request(method, path, body, {**headers, **auth("crm_not-a-token")})
    assert status == 401
    for scope in ("ingest", "read", "admin"):
        status, answer = service.request(method, path, body, {**headers, **auth(tokens[scope])})
        if scope in allowed:
            assert status not in (401, 403), (scope, status, answer)
        else:
            assert status == 403, (scope, status, answer)
            assert f"scope '{scope}' does not allow" in answer["error"]


# -- producers ------------------------------------------------------------------------------------


def test_a_list_with_one_bad_message_enqueues_nothing(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    good = [call(n, now - timedelta(days=40, minutes=n), "http-bad-list") for n in range(3)]
    bad = {**good[1], "status": None, "duration_s": "long"}
    status, answer = post(service, "/v1/calls", [good[0], bad, good[2]], tokens["ingest"])
    assert status == 400
    assert answer["index"] == 1 and "duration_s" in answer["errors"]
    # Nothing of the list was queued: the good messages have no event, now or later.
    status, answer = post(service, "/v1/calls", [good[0]], tokens["ingest"])
    assert status == 202 and answer["accepted"] == 1
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    status, page = service.request(
        "GET", "/v1/events?source=http-bad-list", headers=auth(tokens["read"])
    )
    assert [e["source_id"] for e in page["events"]] == ["http-bad-list-0"]


def test_what_the_service_refuses_it_says_why(service: HttpService, tokens: dict[str, str]) -> None:
    headers = {"Content-Type": "application/json", **auth(tokens["ingest"])}
    deep = "[" * 5000 + "]" * 5000
    status, answer = service.request("POST", "/v1/calls", deep.encode(), headers)
    assert status == 400 and "nested deeper" in answer["error"]
    status, answer = service.request("POST", "/v1/calls", b"{not json", headers)
    assert status == 400 and answer["error"].startswith("not JSON")
    status, answer = service.request("POST", "/v1/calls", b"x" * (1024 * 1024 + 1), headers)
    assert status == 413 and "over" in answer["error"]
    status, answer = service.request(
        "POST", "/v1/calls", b"a=b", {**headers, "Content-Type": "text/plain"}
    )
    assert status == 415
    status, answer = service.request("GET", "/v1/nothing-here")
    assert status == 404 and "no such endpoint" in answer["error"]
    status, answer = service.request("DELETE", "/v1/events", headers=auth(tokens["admin"]))
    assert status == 405
    status, headers, _ = service.exchange("PUT", "/v1/tasks", b"{}", auth(tokens["admin"]))
    assert status == 405 and sorted(headers["allow"].split(", ")) == ["GET", "HEAD", "POST"]


def cursor(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("path", "status", "said"),
    [
        # Ids no database keeps: no such path (not a 500 of int() or of the database's integer).
        ("/v1/events/" + "9" * 5000, 404, "no such endpoint"),
        ("/v1/events/9223372036854775808", 404, "no such endpoint"),
        ("/v1/events/1/documents/18446744073709551616", 404, "no such endpoint"),
        ("/v1/events/999999999999999999", 404, "no event 999999999999999999"),
        ("/v1/events/2147483648/documents/1", 404, "event 2147483648 has no stored document"),
        # Days and periods at the ends of the calendar, where a zone's midnight is no UTC time.
        ("/v1/events?since=0001-01-01", 400, "not a date of the years 2 to 9998"),
        ("/v1/events?until=9999-12-31", 400, "not a date of the years 2 to 9998"),
        (f"/v1/sellers/{SELLER}/view?period=0001-W01", 400, "a period of the years 2 to 9998"),
        (f"/v1/sellers/{SELLER}/view?period=9999-W52", 400, "a period of the years 2 to 9998"),
        ("/v1/targets/progress?period=9999-W52", 400, "a period of the years 2 to 9998"),
        # Cursors this search never wrote.
        ("/v1/events?cursor=" + cursor("2026-11-26T16:45:00|5"), 400, "not a cursor"),
        ("/v1/events?cursor=" + cursor("2026-11-26T16:45:00+02:00|" + "9" * 20), 400, "cursor"),
        ("/v1/events?cursor=" + cursor("0001-01-01T00:00:00+14:00|5"), 400, "not a cursor"),
        # Past PostgreSQL's integer, which every id is: the statement itself would fail.
        ("/v1/events?cursor=" + cursor("2026-11-26T16:45:00+02:00|" + str(2**40)), 400, "cursor"),
        # Each word is two conditions: a thousand of them were more than SQLite takes.
        ("/v1/events?text=" + "+".join(f"w{i}" for i in range(1100)), 400, "at most 32 words"),
    ],
)
def test_what_no_query_can_name_is_refused_with_its_reason(
    service: HttpService, tokens: dict[str, str], path: str, status: int, said: str
) -> None:
    answered, answer = service.request("GET", path, headers=auth(tokens["read"]))
    assert (answered, said in answer["error"]) == (status, True), answer


def test_forms_that_are_not_ours_are_refused_not_a_500(
    service: HttpService, tokens: dict[str, str]
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    # A CSRF token that is not ASCII (hmac.compare_digest refuses such a str: it was a 500).
    status, _, _ = service.exchange(
        "POST", "/login", b"token=x&csrf=%C3%A4", {**form, "Cookie": "crm_login_csrf=abc"}
    )
    assert status == 403
    admin = session_cookie(service, tokens["admin"])
    status, answer = service.request(
        "POST", "/triage/1/link", b"customer=1&csrf=%C3%A4", {**form, "Cookie": admin}
    )
    assert status == 403 and "CSRF" in answer["error"]
    many = "&".join(f"f{i}=1" for i in range(11)).encode()
    status, answer = service.request("POST", "/triage/1/link", many, {**form, "Cookie": admin})
    assert status == 400 and "unreadable form" in answer["error"]


def test_a_visit_appears_in_the_sellers_view_and_on_the_stream(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    received: list[str] = []
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with socket.create_connection(("127.0.0.1", service.port), timeout=60) as sock:
            sock.sendall(
                f"GET /v1/stream/sellers/{SELLER} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {tokens['read']}\r\n\r\n".encode()
            )
            buffer = b""
            while not stop.is_set():
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                if b"event: ready" in buffer:
                    ready.set()
                if b"event: view" in buffer:
                    received.append(buffer.decode("utf-8", "replace"))
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(30), "the stream did not start"
    now = datetime.now(UTC).replace(microsecond=0)
    status, answer = post(service, "/v1/visits", visit(now, "Livekäynti"), tokens["ingest"])
    assert status == 202, answer
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    listener.join(60)
    stop.set()
    assert received, "no view event on the stream"
    assert f'"seller": "{SELLER}"' in received[0]
    status, cards = service.request(
        "GET", f"/v1/sellers/{SELLER}/view", headers=auth(tokens["read"])
    )
    assert status == 200
    card = next(c for c in cards if c["category"] == "customer_visit")
    assert any(e["subject"] == "Livekäynti" for e in card["events"])
    assert card["count_week"] == sum(e["in_week"] for e in card["events"])
    # Any period: the previous month's view is the month as it ended.
    last_month = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    status, cards = service.request(
        "GET", f"/v1/sellers/{SELLER}/view?period={last_month}", headers=auth(tokens["read"])
    )
    assert status == 200 and all(c["month"] == last_month for c in cards)
    status, answer = service.request(
        "GET", f"/v1/sellers/{SELLER}/view?period=2026-W99", headers=auth(tokens["read"])
    )
    assert status == 400
    status, answer = service.request(
        "GET", "/v1/sellers/nobody-at-all/view", headers=auth(tokens["read"])
    )
    assert status == 404


def mail_with_attachment(attachment: bytes, filename: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Heikki Myyjä <heikki.myyja@myyntitalo.fi>"
    message["To"] = "Vilma Verkko <vilma@verkkotesti.fi>"
    message["Bcc"] = "crm@myyntitalo.fi"
    message["Subject"] = "Tarjous liitteenä"
    message["Date"] = "Tue, 17 Nov 2026 10:00:00 +0200"
    message["Message-ID"] = f"<http-{uuid.uuid4().hex}@myyntitalo.fi>"
    message.set_content("Hei Vilma, tarjous liitteenä.")
    message.add_attachment(attachment, maintype="application", subtype="pdf", filename=filename)
    return message.as_bytes(policy=email.policy.SMTP)


def test_a_revoked_tokens_stream_ends_at_its_next_event(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    """A stream is not a way around revoking its token: the next change ends it, unsent."""
    name = f"http-stream-{uuid.uuid4().hex[:6]}"
    sock, status, received = open_stream(service, read_token(world, name))
    assert status == 200 and sock is not None
    with sock:
        assert world.cli("token", "revoke", name).returncode == 0
        now = datetime.now(UTC).replace(microsecond=0)
        status, answer = post(service, "/v1/visits", visit(now, "Peruttu"), tokens["ingest"])
        assert status == 202, answer
        assert outcomes(world, answer["task_ids"]) == ["stored"]
        while chunk := sock.recv(65536):  # until the service ends the stream
            received += chunk
    assert b"event: view" not in received


def test_a_document_downloads_byte_for_byte_with_a_safe_name(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
    name = 'Tarjous "2026"; X-Evil: 1 ..\\..\\etc\\passwd ö.pdf'
    raw = mail_with_attachment(pdf, name)
    status, answer = service.request(
        "POST", "/v1/emails", raw, {"Content-Type": "message/rfc822", **auth(tokens["ingest"])}
    )
    assert status == 202, answer
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    status, page = service.request(
        "GET", f"/v1/events?customer={CUSTOMER}&text=Tarjous", headers=auth(tokens["read"])
    )
    [event] = [e for e in page["events"] if e["subject"] == "Tarjous liitteenä"]
    [document] = [d for d in event["documents"] if d["media_type"] == "application/pdf"]
    status, headers, body = service.exchange(
        "GET",
        f"/v1/events/{event['id']}/documents/{document['id']}",
        headers=auth(tokens["read"]),
    )
    assert status == 200
    assert body == pdf
    assert headers["content-type"] == "application/pdf"
    assert headers["x-content-type-options"] == "nosniff"
    disposition = headers["content-disposition"]
    assert disposition.startswith('attachment; filename="') and "\r" not in disposition
    plain = disposition.split('filename="', 1)[1].split('"', 1)[0]
    assert plain.isascii() and "\\" not in plain and ";" not in plain and ".." not in plain
    assert disposition.endswith("%C3%B6.pdf")  # the exact name, percent-encoded (RFC 5987)
    assert "x-evil" not in headers
    # Who downloaded which document is logged, by ids: not the name, which may name a person.
    # The line is written before the first byte of the body is sent: it is there by now.
    logged = (
        f"document {document['id']} (sha256 {document['sha256'][:12]}…) of event {event['id']}"
        f" downloaded by token {tokens['read-name']!r} (staff -)"
    )
    assert logged in service.log.read_text(errors="replace")
    status, one = service.request("GET", f"/v1/events/{event['id']}", headers=auth(tokens["read"]))
    assert status == 200 and one["id"] == event["id"] and "follow_ups" in one
    status, _, _ = service.exchange(
        "GET", f"/v1/events/{event['id']}/documents/999999999", headers=auth(tokens["read"])
    )
    assert status == 404
    status, history = service.request(
        "GET", f"/v1/customers/{CUSTOMER}/history", headers=auth(tokens["read"])
    )
    assert status == 200 and history["customer_number"] == CUSTOMER
    assert any(e["id"] == event["id"] for e in history["events"])


def test_pages_neither_skip_nor_repeat_while_events_are_stored(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    source = f"http-paging-{uuid.uuid4().hex[:6]}"
    base = datetime.now(UTC) - timedelta(days=60)
    first = [call(n, base + timedelta(minutes=n), source) for n in range(24)]
    status, answer = post(service, "/v1/calls", first, tokens["ingest"])
    assert status == 202
    outcomes(world, answer["task_ids"])
    seen: list[str] = []
    cursor = None
    inserted = 0
    while True:
        query = f"/v1/events?source={source}&limit=5" + (f"&cursor={cursor}" if cursor else "")
        status, page = service.request("GET", query, headers=auth(tokens["read"]))
        assert status == 200, page
        seen += [e["source_id"] for e in page["events"]]
        if inserted < 3:
            # While paging: one newer than every page, one older, one among those read.
            more = [
                call(100 + inserted, base + timedelta(days=1), source),
                call(200 + inserted, base - timedelta(days=1), source),
                call(300 + inserted, base + timedelta(minutes=20, seconds=30), source),
            ]
            status, answer = post(service, "/v1/calls", more, tokens["ingest"])
            outcomes(world, answer["task_ids"])
            inserted += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "an event was given twice"
    assert {c["call_id"] for c in first} <= set(seen), "an event was skipped"
    status, answer = service.request(
        "GET", "/v1/events?cursor=not-a-cursor", headers=auth(tokens["read"])
    )
    assert status == 400
    status, answer = service.request("GET", "/v1/events?limit=0", headers=auth(tokens["read"]))
    assert status == 400
    # A filter that names nothing says so, instead of answering an empty page.
    status, answer = service.request(
        "GET", "/v1/events?class=Myyntii", headers=auth(tokens["read"])
    )
    assert status == 400
    assert "no class 'Myyntii': the class is one of " in json.dumps(answer, ensure_ascii=False)
    status, answer = service.request(
        "GET", "/v1/events?class=Myynti&limit=1", headers=auth(tokens["read"])
    )
    assert status == 200
    # The CRM status by code or by its Finnish name: every event here is done (valmis).
    status, answer = service.request(
        "GET", "/v1/events?state=Valmis&limit=3", headers=auth(tokens["read"])
    )
    assert status == 200 and [e["state"] for e in answer["events"]] == ["done"] * 3
    status, answer = service.request("GET", "/v1/events?state=open", headers=auth(tokens["read"]))
    assert (status, answer["events"]) == (200, [])
    status, answer = service.request(
        "GET", "/v1/events?state=finished", headers=auth(tokens["read"])
    )
    assert status == 400 and "no state 'finished'" in json.dumps(answer)


# -- operations -----------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_names_every_endpoint(service: HttpService) -> None:
    status, document = service.request("GET", "/openapi.json")
    assert status == 200
    validate(document)
    for path in (
        "/v1/calls", "/v1/visits", "/v1/parties", "/v1/targets", "/v1/emails", "/v1/events",
        "/v1/events/{event_id}", "/v1/events/{event_id}/documents/{document_id}",
        "/v1/customers/{number}/history", "/v1/sellers/{username}/view",
        "/v1/targets/progress", "/v1/stream/sellers/{username}", "/twilio/status", "/calls",
        "/asterisk/cdr", "/healthz", "/metrics",
    ):  # fmt: skip
        assert path in document["paths"], path
    assert "CallMessage" in document["components"]["schemas"]
    status, page = service.request("GET", "/docs")
    assert status == 200 and "/v1/sellers/{username}/view" in page


def metric(service: HttpService, name: str) -> float:
    status, text = service.request("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_when_messages_are_processed(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    name = 'crm_messages_total{outcome="stored",task="crm.ingest.visit"}'
    before = metric(service, name)
    status, answer = post(
        service, "/v1/visits", visit(datetime.now(UTC) - timedelta(days=50)), tokens["ingest"]
    )
    assert status == 202
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    assert metric(service, name) == before + 1
    for family in (
        'crm_queue_messages{queue="crm.ingest.call"}',
        "crm_unacked_messages",
        "crm_unlinked_events",
        "crm_oldest_pending_refresh_seconds",
    ):
        status, text = service.request("GET", "/metrics")
        assert family in text, family
    status, health = service.request("GET", "/healthz")
    assert (status, health) == (200, {"status": "ok", "database": "ok", "broker": "ok"})


def test_slow_clients_are_dropped_and_hold_no_one_up(service: HttpService) -> None:
    """Header-trickling clients: each sends a line now and then, never idle, never done."""
    tricklers = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=60)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        tricklers.append(sock)
    # Everyone else is served meanwhile.
    status, _ = service.request("GET", "/healthz")
    assert status == 200
    answers = []
    for sock in tricklers:
        received = b""
        try:
            while True:
                with contextlib.suppress(OSError):  # closed already: read what it said
                    sock.sendall(b"X-Slow: 1\r\n")
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        finally:
            sock.close()
        answers.append(received)
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
    assert any(a.startswith(b"HTTP/1.1 408") for a in answers)


def test_a_body_that_stops_arriving_is_answered_408(
    service: HttpService, tokens: dict[str, str]
) -> None:
    """The headers whole, the body never: the client is told, and the service logs no failure
    (test_requests_are_logged_without_their_secrets_or_a_traceback reads the log after)."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/calls HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + tokens["ingest"].encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\n{}"
        )
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"did not arrive within" in received


# -- browsers -------------------------------------------------------------------------------------


def test_a_browser_signs_in_with_a_token_and_forms_need_their_csrf_token(
    service: HttpService, tokens: dict[str, str]
) -> None:
    status, headers, body = service.exchange("GET", "/login")
    assert status == 200 and b'name="csrf"' in body
    assert service.exchange("HEAD", "/login")[0] == 200  # not a form post without its token
    login_cookie = headers["set-cookie"].split(";", 1)[0]
    csrf = body.split(b'name="csrf" value="', 1)[1].split(b'"', 1)[0].decode()
    form = f"csrf={csrf}&token={tokens['read']}&next=/v1/targets/progress".encode()
    form_headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": login_cookie}
    status, headers, _ = service.exchange("POST", "/login", form, form_headers)
    assert status == 303 and headers["location"] == "/v1/targets/progress"
    [session] = [c for c in headers["set-cookie"].split("\n") if c.startswith("crm_session=")]
    assert "HttpOnly" in session and "samesite=lax" in session.lower()
    cookie = session.split(";", 1)[0]
    status, answer = service.request("GET", "/v1/targets/progress", headers={"Cookie": cookie})
    assert status == 200 and isinstance(answer, list)
    # A session posts no messages, even an admin's: only a token does.
    admin = session_cookie(service, tokens["admin"])
    status, answer = service.request(
        "POST", "/v1/visits", b"{}", {"Content-Type": "application/json", "Cookie": admin}
    )
    assert status == 403 and "Authorization: Bearer" in answer["error"]
    # A form posted without the login page's token is refused; a wrong token is not signed in.
    status, _, _ = service.exchange("POST", "/login", b"token=x&csrf=forged", form_headers)
    assert status == 403
    bad = f"csrf={csrf}&token=crm_wrong".encode()
    status, _, body = service.exchange("POST", "/login", bad, form_headers)
    assert status == 401 and b'role="alert"' in body
    # Never a redirect to another site.
    status, headers, _ = service.exchange(
        "GET", f"/login?token={tokens['read']}&next=https://evil.example/"
    )
    assert status == 303 and headers["location"] == "/"


def test_requests_are_logged_without_their_secrets_or_a_traceback(
    service: HttpService, tokens: dict[str, str]
) -> None:
    """Every request above is in the log, none of the tokens, no traceback."""
    service.exchange("GET", f"/login?token={tokens['admin']}&next=/")
    text = service.log.read_text()
    assert '"GET /login" 303' in text and '"POST /v1/calls" 400' in text
    assert "Traceback" not in text
    for key, token in tokens.items():
        if not key.endswith("-name"):  # a token's name is no secret: the download log has it
            assert token not in text


def test_a_path_is_logged_as_sent_so_no_line_can_be_forged(service: HttpService) -> None:
    """The path was logged decoded: %0A split the line, and what followed it read as a line of
    its own (here a made-up request); %00 made the log a binary file to grep."""
    forged = "%0A1999-01-01%2000:00:00,000%20INFO%20crm.http.access:%20GET%20/forged%20200"
    path = f"/sellers/x{forged}%00y"
    status, _headers, _body = service.exchange("GET", path)
    assert status == 404
    lines = logged(service, f'"GET {path}" 404').splitlines()
    assert not [line for line in lines if line.startswith("1999-01-01") or "\x00" in line]
    assert len([line for line in lines if f'"GET {path}" 404' in line]) == 1


# -- the screens: who may see them, and nothing a sender wrote runs in them -----------------------


def session_cookie(service: HttpService, token: str) -> str:
    status, headers, _ = service.exchange("GET", f"/login?token={token}&next=/")
    assert status == 303
    [cookie] = [c for c in headers["set-cookie"].split("\n") if c.startswith("crm_session=")]
    return cookie.split(";", 1)[0]


@pytest.mark.parametrize(
    "path", [f"/sellers/{SELLER}", "/board", f"/customers/{CUSTOMER}", "/triage"]
)
def test_each_screen_needs_a_signed_in_reader(
    service: HttpService, tokens: dict[str, str], path: str
) -> None:
    status, page = service.request("GET", path)
    assert status == 401 and 'name="token"' in page  # the sign-in form, to come back here
    status, page = service.request("GET", path, headers={"Cookie": "crm_session=forged.x.y"})
    assert status == 401
    cookie = session_cookie(service, tokens["ingest"])
    status, page = service.request("GET", path, headers={"Cookie": cookie})
    assert status == 403
    for scope in ("read", "admin"):
        cookie = session_cookie(service, tokens[scope])
        status, page = service.request("GET", path, headers={"Cookie": cookie})
        assert status == 200, (scope, page[:500])


def test_linking_in_triage_needs_the_admin_scope_and_the_forms_csrf_token(
    service: HttpService, tokens: dict[str, str]
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reader = session_cookie(service, tokens["read"])
    status, _ = service.request("POST", "/triage/1/link", b"customer=1", {**form, "Cookie": reader})
    assert status == 403
    admin = session_cookie(service, tokens["admin"])
    status, answer = service.request(
        "POST", "/triage/1/link", b"customer=1&csrf=forged", {**form, "Cookie": admin}
    )
    assert status == 403 and "CSRF" in answer["error"]


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_nothing_a_sender_wrote_is_markup_on_a_screen(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    party = {"schema": "crm.party/1", "source_system": "erp"}
    [done] = world.publish(
        "party",
        [{**party, "kind": "contact", "customer_number": CUSTOMER, "name": f"Vilja {HOSTILE}",
          "email": "vilja@verkkotesti.fi"}],
    )  # fmt: skip
    assert done.outcome == "done"
    now = datetime.now(UTC).replace(microsecond=0)
    hostile_visit = {**visit(now, f"Käynti {HOSTILE}"), "memo": f"Muistio {HOSTILE}",
                     "contacts": ["vilja@verkkotesti.fi"]}  # fmt: skip
    status, answer = post(service, "/v1/visits", hostile_visit, tokens["ingest"])
    assert status == 202
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    raw = mail_with_attachment(b"%PDF-1.4\n%%EOF\n", f"{HOSTILE}.pdf")
    status, answer = service.request(
        "POST", "/v1/emails", raw, {"Content-Type": "message/rfc822", **auth(tokens["ingest"])}
    )
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    unlinked = {**call(1, now, f"hostile-{uuid.uuid4().hex[:6]}"), "from": "+358 40 999 8877",
                "agent": None, "note": HOSTILE}  # fmt: skip
    status, answer = post(service, "/v1/calls", unlinked, tokens["ingest"])
    assert outcomes(world, answer["task_ids"]) == ["stored"]
    cookie = session_cookie(service, tokens["admin"])
    for path in (f"/sellers/{SELLER}", f"/customers/{CUSTOMER}", "/triage", "/board"):
        status, page = service.request("GET", path, headers={"Cookie": cookie})
        assert status == 200
        assert "<script>alert" not in page and "<img src=x" not in page, path
    status, page = service.request("GET", f"/customers/{CUSTOMER}", headers={"Cookie": cookie})
    assert "Käynti &lt;script&gt;" in page and "Muistio &lt;script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_a_username_with_url_characters_is_linked_and_streamed_as_itself(
    world: LiveSystem, service: HttpService, tokens: dict[str, str]
) -> None:
    """A username may hold a space, '?', '#', '%' or '/': in a link or the stream's address each
    is quoted, or the path would end or branch there (the seller's screen, live updates, the
    board, the home page's redirect), and each of its addresses takes it whole."""
    odd = f"tiimi/odd {uuid.uuid4().hex[:4]}?x#y%"
    party = {"schema": "crm.party/1", "source_system": "erp"}
    [done] = world.publish(
        "party",
        [{**party, "kind": "staff", "username": odd, "name": "Outo Nimi",
          "email": "outo.nimi@myyntitalo.fi", "role": "seller", "manager": "http-manager"}],
    )  # fmt: skip
    assert done.outcome == "done", done.detail
    quoted = urllib.parse.quote(odd, safe="")
    cookie = session_cookie(service, tokens["admin"])
    status, page = service.request("GET", f"/sellers/{quoted}", headers={"Cookie": cookie})
    assert status == 200, str(page)[:300]
    assert f'data-live-stream="/v1/stream/sellers/{quoted}"' in page
    status, board = service.request(
        "GET", "/board?manager=http-manager", headers={"Cookie": cookie}
    )
    assert status == 200 and f'href="/sellers/{quoted}"' in board
    status, cards = service.request(
        "GET", f"/v1/sellers/{quoted}/view", headers=auth(tokens["read"])
    )
    assert status == 200 and isinstance(cards, list), cards
    sock, status, received = open_stream(service, tokens["read"], odd)
    assert status == 200 and sock is not None, received
    sock.close()
    name = f"http-odd-{uuid.uuid4().hex[:6]}"
    made = world.cli("token", "create", name, "--scope", "read", "--staff", odd, "--json")
    assert made.returncode == 0, made.stderr
    own = session_cookie(service, json.loads(made.stdout)["token"])
    status, headers, _body = service.exchange("GET", "/", headers={"Cookie": own})
    assert (status, headers["location"]) == (303, f"/sellers/{quoted}")
    number = f"AB/{uuid.uuid4().hex[:6]}"
    [done] = world.publish(
        "party",
        [{**party, "kind": "customer", "customer_number": number, "name": "Vinoviiva Oy"}],
    )
    assert done.outcome == "done", done.detail
    path = urllib.parse.quote(number, safe="")
    status, history = service.request(
        "GET", f"/v1/customers/{path}/history", headers=auth(tokens["read"])
    )
    assert status == 200 and history["customer_number"] == number, history
    status, page = service.request("GET", f"/customers/{path}", headers={"Cookie": cookie})
    assert status == 200 and "Vinoviiva Oy" in page


def test_the_language_links_never_name_the_host_the_client_said(
    service: HttpService, tokens: dict[str, str]
) -> None:
    cookie = session_cookie(service, tokens["read"])
    status, page = service.request(
        "GET", "/board?week=1", headers={"Cookie": cookie, "Host": "evil.example"}
    )
    assert status == 200
    assert 'href="/board?week=1&amp;lang=en"' in page and "evil.example" not in page


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/board/?week=1", "/board?week=1"),
        ("/v1/events//", "/v1/events"),
        (f"/sellers/{SELLER}/", f"/sellers/{SELLER}"),
        ("/sellers/h%C3%A4n/", "/sellers/h%C3%A4n"),  # as the client encoded it
    ],
)
def test_a_trailing_slash_redirects_to_the_path_never_to_the_host_the_client_said(
    service: HttpService, path: str, location: str
) -> None:
    status, headers, _body = service.exchange("GET", path, headers={"Host": "evil.example"})
    assert (status, headers["location"]) == (307, location)


# An encoded slash is no trailing slash: redirected to itself, a client went round for ever.
@pytest.mark.parametrize(
    "path", ["//evil.example/", "/nothing-here/", "///", "/board/%2F", "/v1/events/%2F/"]
)
def test_a_trailing_slash_of_no_route_is_not_found_not_sent_elsewhere(
    service: HttpService, path: str
) -> None:
    status, headers, _body = service.exchange("GET", path)
    assert status == 404 and "location" not in headers


def read_until(sock: socket.socket, marker: bytes, received: bytes = b"") -> bytes:
    """What ``sock`` sends until ``marker`` has come (the connection must not end first)."""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return received


def logged(service: HttpService, text: str) -> str:
    """The service's log once it holds ``text`` (a line is written after its answer is sent)."""
    return wait_for_log(service.log, text)


def open_stream(
    service: HttpService, token: str, seller: str = SELLER
) -> tuple[socket.socket | None, int, bytes]:
    """A seller's stream: (the socket, held open past its ready, or None), status, what came."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=60)
    sock.sendall(
        f"GET /v1/stream/sellers/{urllib.parse.quote(seller, safe='')} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    received = read_until(sock, b"\r\n\r\n")
    status = int(received.split(b" ", 2)[1])
    if status != 200:
        received = read_until(sock, b'"}', received)  # the JSON reason, a flat object
        sock.close()
        return None, status, received
    return sock, status, read_until(sock, b"event: ready", received)


@pytest.fixture(scope="module")
def narrow(world: LiveSystem) -> Iterator[HttpService]:
    """A service that holds at most 3 streams, 2 of one token."""
    env = {**world.env, "CRM_HTTP_MAX_STREAMS": "3", "CRM_HTTP_STREAMS_PER_TOKEN": "2"}
    running = start_service(env, world.settings.data_dir / "http-narrow.log")
    yield running
    stop_service(running)


def read_token(world: LiveSystem, name: str = "") -> str:
    name = name or f"http-streams-{uuid.uuid4().hex[:6]}"
    made = world.cli("token", "create", name, "--scope", "read", "--json")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["token"])


def test_streams_are_held_within_their_limits_and_let_go_when_closed(
    world: LiveSystem, narrow: HttpService
) -> None:
    """Streams cannot take every connection: 2 of one token (429 above), 3 in all (503 above),
    each refusal with its reason and Retry-After; a stream closed frees its place."""
    first, second = read_token(world), read_token(world)
    held = []
    for _ in range(2):
        sock, status, _received = open_stream(narrow, first)
        assert status == 200 and sock is not None
        held.append(sock)
    _none, status, received = open_stream(narrow, first)
    assert status == 429
    assert b"retry-after: 30" in received.lower()
    assert b"as many as one token may" in received
    sock, status, _received = open_stream(narrow, second)
    assert status == 200 and sock is not None
    held.append(sock)
    _none, status, received = open_stream(narrow, second)
    assert status == 503
    assert b"retry-after: 30" in received.lower()
    assert b"as many event streams as it may" in received
    assert metric(narrow, "crm_http_open_streams") == 3
    held.pop(0).close()
    deadline = time.monotonic() + 30
    while True:  # until the service has seen it gone
        sock, status, _received = open_stream(narrow, first)
        if status == 200:
            break
        assert status in (429, 503) and time.monotonic() < deadline, status
    assert sock is not None
    held.append(sock)
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 30
    while metric(narrow, "crm_http_open_streams"):  # each let go as its client is seen gone
        assert time.monotonic() < deadline, "a closed stream is still counted"


def test_a_head_of_a_stream_answers_its_headers_and_holds_no_place(
    world: LiveSystem, narrow: HttpService
) -> None:
    """A HEAD's body is never written, so a client gone was never noticed: three HEADs, then a
    request on the same connection (a keep-alive client), held the token's places for the
    stream's lifetime and left the request unanswered."""
    token = read_token(world)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", narrow.port), timeout=30) as sock:
            sock.sendall(
                f"HEAD /v1/stream/sellers/{SELLER} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
                "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            received = read_until(sock, b'{"status":"alive"}')
        head = received.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200") and b"content-type: text/event-stream" in head
    assert metric(narrow, "crm_http_open_streams") == 0
    stream, status, _received = open_stream(narrow, token)
    assert status == 200 and stream is not None
    stream.close()


@pytest.fixture(scope="module")
def brief(world: LiveSystem) -> Iterator[HttpService]:
    """A service whose streams last a second."""
    env = {**world.env, "CRM_HTTP_STREAM_LIFETIME_S": "1"}
    running = start_service(env, world.settings.data_dir / "http-brief.log")
    yield running
    stop_service(running)


def test_a_stream_ends_after_its_lifetime_and_the_client_comes_back(
    world: LiveSystem, brief: HttpService
) -> None:
    """A forgotten or half-open stream holds no place for ever: it ends, and a reconnection
    (the browser's, after ``retry``) is a new stream that asks for the token again."""
    name = f"http-brief-{uuid.uuid4().hex[:6]}"
    token = read_token(world, name)
    for _ in range(2):  # the second: the client back after the first ended
        sock, status, received = open_stream(brief, token)
        assert status == 200 and sock is not None
        assert b"retry: 2000" in received
        with sock:
            while not received.endswith(b"0\r\n\r\n"):  # the last chunk: the stream is over
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
    assert world.cli("token", "revoke", name).returncode == 0
    _none, status, _received = open_stream(brief, token)
    assert status == 401


def test_a_stream_whose_client_reads_nothing_ends_at_the_request_deadline(
    world: LiveSystem, service: HttpService
) -> None:
    """Its writes block once the buffers are full: the stream would never reach its next check
    of the token or its lifetime's end, and held its place. A write that waits longer than the
    request deadline (CRM_HTTP_REQUEST_DEADLINE_S) ends it, and the connection is closed."""
    import redis

    sock, status, _received = open_stream(service, read_token(world))
    assert status == 200 and sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    with sock:
        # 18 MB of notifications: more than the connection's buffers hold, less than Redis
        # keeps for a subscriber that lags (32 MB).
        client = redis.Redis.from_url(world.settings.effective_redis_url)
        big = json.dumps({"seller": SELLER, "padding": "x" * 60_000})
        for _ in range(300):
            client.publish(f"crm.seller.{SELLER}", big)
        client.close()
        logged(service, "the client read nothing for")
        deadline = time.monotonic() + 60
        while metric(service, "crm_http_open_streams"):  # its place is let go
            assert time.monotonic() < deadline, "the stream is still counted"
        # Closed unread: draining what the buffers hold through a 2 kB window takes minutes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_serve_stops_on_sigterm_though_streams_are_open(world: LiveSystem) -> None:
    """It waited for every connection to close, and a stream closes at its lifetime's end (an
    hour): a stop (docker stop, systemd) hung until it was killed."""
    running = start_service(world.env, world.settings.data_dir / "http-stopping.log")
    try:
        sock, status, _received = open_stream(running, read_token(world))
        assert status == 200 and sock is not None
        with sock:
            running.process.send_signal(signal.SIGTERM)
            # uvicorn stops, then raises the signal again: a supervisor sees how it ended.
            assert running.process.wait(timeout=60) in (0, -signal.SIGTERM)
            while sock.recv(65536):  # the stream ended, and the connection with it
                pass
    finally:
        stop_service(running)
    assert "Traceback" not in running.log.read_text()
