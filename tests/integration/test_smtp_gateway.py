"""The SMTP/LMTP gateway over real loopback SMTP (smtplib), with the real worker behind it.

Gateways run as ``crm-events smtp-gateway`` subprocesses on the live system's PostgreSQL and
Redis; each test sends mail the way the company's mail server would and reads the outcome
from the database and the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from models.events import CrmEvent
from models.ledger import InboundMessage
from tasks.views import events_json
from tests.conftest import EXAMPLES, ROOT, load_example
from tests.integration.conftest import LiveSystem
from tests.processes import free_port
from workers.publish import Outcome, wait_for

pytestmark = pytest.mark.integration

#: Small limits for the test gateways, so that the over-limit cases stay fast.
MAX_EMAIL_BYTES = 300_000
INLINE_MAX_BYTES = 20_000


@dataclass
class Gateway:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_gateway(live: LiveSystem, name: str, *extra: str, **env: str) -> Gateway:
    port = free_port()
    log = live.settings.data_dir / f"{name}.log"
    environment = live.env | {
        "CRM_MAX_EMAIL_BYTES": str(MAX_EMAIL_BYTES),
        "CRM_EMAIL_INLINE_MAX_BYTES": str(INLINE_MAX_BYTES),
        **env,
    }
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "smtp-gateway", "--port", str(port), *extra],
            env=environment,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    gateway = Gateway("127.0.0.1", port, process, log)
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, f"gateway exited:\n{gateway.tail()}"
        try:
            socket.create_connection((gateway.host, port), timeout=1).close()
            return gateway
        except OSError:
            assert time.monotonic() < deadline, f"gateway not listening:\n{gateway.tail()}"
            time.sleep(0.1)


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.send_signal(signal.SIGTERM)
    try:
        gateway.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


@pytest.fixture(scope="module")
def loaded(live: LiveSystem) -> LiveSystem:
    outcomes = live.publish("party", load_example("parties.json"))
    assert {d.outcome for d in outcomes} == {"done"}
    return live


@pytest.fixture(scope="module")
def smtp(loaded: LiveSystem) -> Iterator[Gateway]:
    gateway = start_gateway(loaded, "smtp-gateway")
    yield gateway
    stop_gateway(gateway)
    # A clean stop on SIGTERM.
    assert gateway.process.returncode == 0, gateway.tail()


@pytest.fixture(scope="module")
def lmtp(loaded: LiveSystem) -> Iterator[Gateway]:
    gateway = start_gateway(loaded, "lmtp-gateway", "--lmtp")
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="module")
def broken(loaded: LiveSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose broker and database are both unreachable (nothing listens on port 9)."""
    gateway = start_gateway(
        loaded,
        "broken-gateway",
        CRM_BROKER_URL="redis://127.0.0.1:9/0",
        CRM_REDIS_URL="redis://127.0.0.1:9/0",
        CRM_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:9/none",
    )
    yield gateway
    stop_gateway(gateway)


def customer_email(
    message_id: str,
    *,
    subject: str = "Huoltosopimus",
    body: str = "Hei, milloin huolto tulee?",
    extra_headers: str = "",
    to: str = "crm@myyntitalo.fi",
    sender: str = "Matti Virtanen <matti.virtanen@pohjolankone.fi>",
) -> bytes:
    return (
        f"From: {sender}\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Wed, 25 Nov 2026 10:00:00 +0200\r\n"
        f"Message-ID: <{message_id}>\r\n"
        f"{extra_headers}"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def send(
    gateway: Gateway, raw: bytes, recipients: list[str], sender: str = "matti@pohjolankone.fi"
) -> tuple[int, str]:
    """MAIL, RCPT and DATA by hand, so the DATA reply (with the task id) can be read."""
    with smtplib.SMTP(gateway.host, gateway.port, timeout=30) as client:
        client.ehlo("mx.myyntitalo.fi")
        code, reply = client.mail(sender)
        assert code == 250, reply
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            if code != 250:
                return code, reply.decode()
        code, reply = client.data(raw)
        return code, reply.decode()


def queued_task(reply: str) -> str:
    match = re.search(r"queued as ([0-9a-f-]{36})", reply)
    assert match, reply
    return match[1]


def outcome(live: LiveSystem, reply: str) -> Outcome:
    task_id = queued_task(reply)
    done = wait_for(live.sessions, [task_id], 60)
    assert task_id in done, f"not processed; worker log:\n{live.tail()}"
    return done[task_id]


def event(live: LiveSystem, event_id: int | None) -> dict:
    assert event_id is not None
    with live.sessions() as session:
        return events_json(session, [session.get_one(CrmEvent, event_id)], live.settings.zone)[0]


# -- accepting mail -------------------------------------------------------------------------------


def test_mail_for_the_crm_address_becomes_an_event(loaded: LiveSystem, smtp: Gateway) -> None:
    raw = customer_email("gw-1@pohjolankone.fi")
    code, reply = send(smtp, raw, ["crm@myyntitalo.fi"])
    assert code == 250, reply
    delivery = outcome(loaded, reply)
    assert delivery.outcome == "stored", delivery.detail
    stored = event(loaded, delivery.event_id)
    assert (stored["customer_number"], stored["contact"], stored["seller"]) == (
        "10001",
        "Matti Virtanen",
        "anna",
    )
    assert stored["body"] == "Hei, milloin huolto tulee?"
    # The bytes as the mail server sent them are the event's raw message.
    (raw_document,) = [d for d in stored["documents"] if d["role"] == "raw_message"]
    assert raw_document["sha256"] == hashlib.sha256(raw).hexdigest()


def test_samples_through_the_gateway(loaded: LiveSystem, smtp: Gateway) -> None:
    for name, recipient in [
        ("forwarded-memo-rfc822.eml", "crm@myyntitalo.fi"),
        ("plus-address-visit-memo.eml", "crm+visit@myyntitalo.fi"),
    ]:
        raw = (EXAMPLES / "emails" / name).read_bytes().replace(b"\r\n", b"\n")
        # An id of its own, so the samples stay new for the other tests of the live system.
        raw = raw.replace(b"Message-ID: <", b"Message-ID: <via-gateway-", 1)
        code, reply = send(smtp, raw.replace(b"\n", b"\r\n"), [recipient])
        assert code == 250, reply
        delivery = outcome(loaded, reply)
        assert delivery.outcome == "stored", delivery.detail
        stored = event(loaded, delivery.event_id)
        assert stored["customer_number"] == "10001"
        assert stored["seller"] == "anna"
        if recipient.startswith("crm+visit"):
            assert stored["category"] == "customer_visit"


def test_other_recipients_are_refused_with_550(loaded: LiveSystem, smtp: Gateway) -> None:
    with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
        client.ehlo("mx.myyntitalo.fi")
        client.mail("matti@pohjolankone.fi")
        for address in ("anna.lahtinen@myyntitalo.fi", "crm@example.com", "crmx@myyntitalo.fi"):
            code, reply = client.rcpt(address)
            assert code == 550, (address, reply)
        assert client.rcpt("CRM+Lead@MyyntiTalo.fi")[0] == 250  # plus-address, any case
    # A mixed list: the CRM address gets the mail, the other is refused, and only the CRM
    # address is in the message's envelope.
    raw = customer_email("gw-mixed@pohjolankone.fi")
    with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
        refused = client.sendmail(
            "matti@pohjolankone.fi", ["crm@myyntitalo.fi", "someone@example.com"], raw
        )
    assert list(refused) == ["someone@example.com"]
    assert refused["someone@example.com"][0] == 550
    with loaded.sessions() as session:
        ledger = session.scalars(
            select(InboundMessage).where(InboundMessage.source_id == "gw-mixed@pohjolankone.fi")
        ).all()
        deadline = time.monotonic() + 30
        while not ledger and time.monotonic() < deadline:
            time.sleep(0.1)
            ledger = session.scalars(
                select(InboundMessage).where(InboundMessage.source_id == "gw-mixed@pohjolankone.fi")
            ).all()
    assert len(ledger) == 1
    assert ledger[0].payload["rcpt_to"] == ["crm@myyntitalo.fi"]


def test_size_limit_is_enforced_in_the_dialogue_with_552(smtp: Gateway) -> None:
    big = customer_email("gw-big@pohjolankone.fi", body="x" * 100 + ("y" * 990 + "\r\n") * 400)
    assert len(big) > MAX_EMAIL_BYTES
    # Announced with SIZE= (smtplib does so when the server offers SIZE): refused at MAIL.
    with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
        client.ehlo("mx.myyntitalo.fi")
        assert int(client.esmtp_features["size"]) == MAX_EMAIL_BYTES
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("matti@pohjolankone.fi", ["crm@myyntitalo.fi"], big)
        assert refused.value.smtp_code == 552
    # Not announced: the data is read, counted and refused at the end of DATA.
    code, reply = send(smtp, big, ["crm@myyntitalo.fi"])
    assert code == 552, reply
    # The gateway is still serving.
    assert (
        send(smtp, customer_email("gw-after-big@pohjolankone.fi"), ["crm@myyntitalo.fi"])[0] == 250
    )


def test_large_mail_travels_by_reference(loaded: LiveSystem, smtp: Gateway) -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 200 + b"\n%%EOF\n"
    import base64

    encoded = base64.encodebytes(pdf).decode("ascii").replace("\n", "\r\n")
    raw = (
        "From: Matti Virtanen <matti.virtanen@pohjolankone.fi>\r\n"
        "To: crm@myyntitalo.fi\r\n"
        "Subject: Laiteluettelo\r\n"
        "Date: Wed, 25 Nov 2026 11:00:00 +0200\r\n"
        "Message-ID: <gw-large@pohjolankone.fi>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Liitteenä laiteluettelo.\r\n"
        "--b1\r\n"
        "Content-Type: application/pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="laitteet.pdf"\r\n'
        "\r\n"
        f"{encoded}"
        "--b1--\r\n"
    ).encode()
    assert INLINE_MAX_BYTES < len(raw) < MAX_EMAIL_BYTES
    code, reply = send(smtp, raw, ["crm@myyntitalo.fi"])
    assert code == 250, reply
    delivery = outcome(loaded, reply)
    assert delivery.outcome == "stored", delivery.detail
    digest = hashlib.sha256(raw).hexdigest()
    with loaded.sessions() as session:
        ledger = session.scalars(
            select(InboundMessage).where(InboundMessage.event_id == delivery.event_id)
        ).one()
    # The queue carried the document's hash, not the bytes.
    assert ledger.payload["raw_ref"] == digest
    assert "raw_b64" not in ledger.payload
    stored = event(loaded, delivery.event_id)
    (attachment,) = [d for d in stored["documents"] if d["role"] == "attachment"]
    assert (attachment["filename"], attachment["media_type"]) == ("laitteet.pdf", "application/pdf")
    assert attachment["sha256"] == hashlib.sha256(pdf).hexdigest()


def test_451_when_the_mail_cannot_be_enqueued_and_nothing_is_lost(
    loaded: LiveSystem, broken: Gateway, smtp: Gateway
) -> None:
    small = customer_email("gw-retry@pohjolankone.fi")
    code, reply = send(broken, small, ["crm@myyntitalo.fi"])
    assert code == 451, reply
    large = customer_email("gw-retry-large@pohjolankone.fi", body=("z" * 900 + "\r\n") * 30)
    assert len(large) > INLINE_MAX_BYTES
    code, reply = send(broken, large, ["crm@myyntitalo.fi"])
    assert code == 451, reply  # the document store (the database) is unreachable
    assert broken.process.poll() is None
    # The sending server keeps the mail and retries; once the way is clear it is stored.
    for raw in (small, large):
        code, reply = send(smtp, raw, ["crm@myyntitalo.fi"])
        assert code == 250, reply
        assert outcome(loaded, reply).outcome == "stored"


# -- what the worker refuses ----------------------------------------------------------------------


def test_auto_replies_and_bounces_are_rejected_with_the_reason(
    loaded: LiveSystem, smtp: Gateway
) -> None:
    auto = (EXAMPLES / "emails" / "auto-reply.eml").read_bytes().replace(b"\r\n", b"\n")
    code, reply = send(smtp, auto.replace(b"\n", b"\r\n"), ["crm@myyntitalo.fi"])
    assert code == 250, reply
    delivery = outcome(loaded, reply)
    assert delivery.outcome == "rejected"
    assert "auto-reply" in delivery.detail
    bounce = customer_email("gw-bounce@mx.example.com", subject="Undeliverable")
    code, reply = send(smtp, bounce, ["crm@myyntitalo.fi"], sender="<>")
    assert code == 250, reply
    delivery = outcome(loaded, reply)
    assert delivery.outcome == "rejected"
    assert "null envelope sender" in delivery.detail
    result = loaded.cli("rejected", "--json")
    assert result.returncode == 0, result.stderr
    reasons = [r["reason"] for r in json.loads(result.stdout)]
    assert any("auto-reply: Auto-Submitted: auto-replied" in r for r in reasons)


# -- threads --------------------------------------------------------------------------------------


def test_replies_share_a_thread_shown_by_events_and_history(
    loaded: LiveSystem, smtp: Gateway
) -> None:
    first = customer_email("thread-a@pohjolankone.fi", subject="Huoltosopimus 2027")
    reply_b = customer_email(
        "thread-b@myyntitalo.fi",
        subject="Re: Huoltosopimus 2027",
        sender="Anna Lahtinen <anna.lahtinen@myyntitalo.fi>",
        to="Matti Virtanen <matti.virtanen@pohjolankone.fi>",
        extra_headers="In-Reply-To: <thread-a@pohjolankone.fi>\r\n"
        "References: <thread-a@pohjolankone.fi>\r\n",
    )
    # A client that sets only In-Reply-To (no References) still joins the conversation.
    reply_c = customer_email(
        "thread-c@pohjolankone.fi",
        subject="Re: Re: Huoltosopimus 2027",
        extra_headers="In-Reply-To: <thread-b@myyntitalo.fi>\r\n",
    )
    # Out of order: the last reply first.
    for raw in (reply_c, first, reply_b):
        code, reply = send(smtp, raw, ["crm@myyntitalo.fi"])
        assert code == 250, reply
        assert outcome(loaded, reply).outcome == "stored"
    result = loaded.cli("events", "--thread", "thread-a@pohjolankone.fi", "--json")
    assert result.returncode == 0, result.stderr
    thread = json.loads(result.stdout)
    assert sorted(e["source_id"] for e in thread) == [
        "thread-a@pohjolankone.fi",
        "thread-b@myyntitalo.fi",
        "thread-c@pohjolankone.fi",
    ]
    history = loaded.cli("history", "10001", "--json")
    assert history.returncode == 0, history.stderr
    keys = {
        e["source_id"]: e["thread_key"]
        for e in json.loads(history.stdout)["events"]
        if e["source_id"].startswith("thread-")
    }
    assert set(keys.values()) == {"thread-a@pohjolankone.fi"}
    # The table as a user sees it on a wide terminal.
    text = subprocess.run(
        [sys.executable, "-m", "workers.cli", "history", "10001"],
        env=loaded.env | {"COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert text.returncode == 0, text.stderr
    assert "thread-a@pohjolankone.fi" in text.stdout


# -- LMTP -----------------------------------------------------------------------------------------


def test_lmtp_answers_once_per_recipient(loaded: LiveSystem, lmtp: Gateway) -> None:
    raw = customer_email("gw-lmtp@pohjolankone.fi", to="crm@myyntitalo.fi, crm+lead@myyntitalo.fi")
    with socket.create_connection((lmtp.host, lmtp.port), timeout=30) as connection:
        stream = connection.makefile("rwb")

        def command(line: str) -> list[str]:
            stream.write(line.encode() + b"\r\n")
            stream.flush()
            return replies(1)

        def replies(count: int) -> list[str]:
            lines: list[str] = []
            while count:
                line = stream.readline().decode().rstrip("\r\n")
                lines.append(line)
                if line[3:4] == " ":
                    count -= 1
            return lines

        assert replies(1)[-1].startswith("220")
        assert command("EHLO mx")[-1].startswith("500")  # LMTP greets with LHLO
        assert command("LHLO mx.myyntitalo.fi")[-1].startswith("250")
        assert command("MAIL FROM:<matti@pohjolankone.fi>")[-1].startswith("250")
        assert command("RCPT TO:<crm@myyntitalo.fi>")[-1].startswith("250")
        assert command("RCPT TO:<other@myyntitalo.fi>")[-1].startswith("550")
        assert command("RCPT TO:<crm+lead@myyntitalo.fi>")[-1].startswith("250")
        assert command("DATA")[-1].startswith("354")
        stream.write(raw + b".\r\n")
        stream.flush()
        answers = replies(2)  # RFC 2033: one reply per accepted recipient
        assert [a[:3] for a in answers] == ["250", "250"]
        assert command("QUIT")[-1].startswith("221")
    delivery = outcome(loaded, answers[0])
    assert delivery.outcome == "stored"
    stored = event(loaded, delivery.event_id)
    assert stored["category"] == "lead"  # crm+lead@
    # smtplib's LMTP client, one recipient.
    with smtplib.LMTP(lmtp.host, lmtp.port, timeout=30) as client:
        refused = client.sendmail(
            "matti@pohjolankone.fi",
            ["crm@myyntitalo.fi"],
            customer_email("gw-lmtp-2@pohjolankone.fi"),
        )
    assert refused == {}


# -- hostile clients ------------------------------------------------------------------------------


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    """What the server sent until ``marker`` (or until it closed the connection)."""
    received = b""
    while marker not in received:
        chunk = connection.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_hostile_clients_do_not_stop_the_gateway(loaded: LiveSystem, smtp: Gateway) -> None:
    # Garbage, an overlong line, and a client that vanishes in the middle of DATA.
    with socket.create_connection((smtp.host, smtp.port), timeout=30) as connection:
        connection.recv(1000)
        connection.sendall(b"\x00\xff\xfe garbage\r\nEHLO x\r\n" + b"A" * 200_000 + b"\r\n")
        connection.sendall(b"MAIL FROM:<matti@pohjolankone.fi>\r\n")
        connection.sendall(b"RCPT TO:<crm@myyntitalo.fi>\r\nDATA\r\n")
        # The gateway has read everything up to DATA once it invites the message: then vanish.
        assert b"354 " in read_until(connection, b"354 "), smtp.tail()
        connection.sendall(b"Subject: cut\r\n\r\npartial")
    with socket.create_connection((smtp.host, smtp.port), timeout=30) as connection:
        connection.recv(1000)
        connection.sendall(b"EHLO x\r\n")
        read_until(connection, b"250 ")
        connection.sendall(b"MAIL FROM:<" + b"a" * 5000 + b"@x.fi>\r\n")
        answer = read_until(connection, b"\r\n")
        assert answer[:1] in (b"4", b"5"), answer  # refused, and answered
    assert smtp.process.poll() is None, smtp.tail()
    raw = customer_email("gw-after-hostile@pohjolankone.fi")
    code, reply = send(smtp, raw, ["crm@myyntitalo.fi"])
    assert code == 250, reply
    assert outcome(loaded, reply).outcome == "stored"
    # Nothing was enqueued for the vanished client.
    with loaded.sessions() as session:
        assert session.scalar(select(CrmEvent.id).where(CrmEvent.subject == "cut")) is None
    assert os.path.exists(smtp.log)
