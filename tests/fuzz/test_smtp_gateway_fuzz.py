"""The SMTP gateway under fuzzing, over real SMTP on loopback: envelopes with odd addresses,
many recipients and overlong lines, and DATA from the raw email strategy.

Every command gets a 2xx/4xx/5xx reply, the gateway stays up, and every mail it accepted is in
its queue; each queued message then goes through the email ingest task and ends as an event or
a rejection. The gateway runs as ``crm-events smtp-gateway`` on the fuzz database (large mail
is stored there and travels as a ``raw_ref``) and on an embedded broker of its own folder.
"""

from __future__ import annotations

import base64
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.fuzz.conftest import IngestRunner
from tests.fuzz.emails import raw_emails
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import FUZZ_WORLD
from tests.processes import free_port

MAX_EMAIL_BYTES = 200_000
INLINE_MAX_BYTES = 2_000


@dataclass
class SmtpGateway:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    data_dir: Path
    queued: list[str] = field(default_factory=list)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def smtp_gateway(runner: IngestRunner, fuzz_root: Path) -> Iterator[SmtpGateway]:
    data_dir = fuzz_root / "smtp-gateway"
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATA_DIR=str(data_dir),
        CRM_DATABASE_URL=runner.settings.database_url,
        CRM_MAX_EMAIL_BYTES=str(MAX_EMAIL_BYTES),
        CRM_EMAIL_INLINE_MAX_BYTES=str(INLINE_MAX_BYTES),
    )
    port = free_port()
    log = data_dir / "smtp-gateway.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "smtp-gateway", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    gateway = SmtpGateway(port, process, log, data_dir)
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, f"gateway exited:\n{gateway.tail()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, f"gateway not listening:\n{gateway.tail()}"
            time.sleep(0.1)
    yield gateway
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- transactions -------------------------------------------------------------------------------

CRM = [
    "crm@myyntitalo.fi",
    "crm+visit@myyntitalo.fi",
    "crm+lead@myyntitalo.fi",
    "CRM@myyntitalo.fi",
]
ODD_ADDRESSES = [
    "",
    "<>",
    "a b@c.fi",
    "ä@ö.fi",
    "x" * 400 + "@y.fi",
    '"quoted local"@myyntitalo.fi',
    "crm@myyntitalo.fi@evil.example",
    "crm+@myyntitalo.fi",
    "crm+visit+lead@myyntitalo.fi",
    "@myyntitalo.fi:crm@myyntitalo.fi",
    "\x01@x.fi",
    "crm@[127.0.0.1]",
    "crm@myyntitalo.fi> SIZE=999999999",
]


@dataclass
class Transaction:
    mail_from: str
    recipients: list[str]
    data: bytes
    long_line: bool

    def __repr__(self) -> str:
        return (
            f"Transaction(mail_from={self.mail_from[:200]!r}, recipients={self.recipients[:5]!r}"
            f"+{max(0, len(self.recipients) - 5)}, long_line={self.long_line}, "
            f"data={self.data[:1500]!r})"
        )


addresses = (
    st.sampled_from(CRM + ODD_ADDRESSES + list(FUZZ_WORLD.addresses))
    | st.emails()
    | st.text(max_size=30)
)


@st.composite
def transactions(draw: Any) -> Transaction:
    recipients = draw(st.lists(st.sampled_from(CRM) | addresses, max_size=6))
    if draw(st.integers(0, 9)) == 0:
        recipients += ["crm@myyntitalo.fi"] * draw(st.sampled_from([50, 120]))
    data = draw(raw_emails(FUZZ_WORLD))
    size = draw(st.sampled_from([INLINE_MAX_BYTES, 0, MAX_EMAIL_BYTES, 0]))
    if size:
        data += b"\r\n" + b"z" * size  # over the inline limit, or over the size limit
    return Transaction(
        mail_from=draw(st.sampled_from(FUZZ_WORLD.addresses) | addresses),
        recipients=recipients,
        data=data,
        long_line=draw(st.integers(0, 9)) == 0,
    )


def command(client: smtplib.SMTP, line: str) -> int:
    client.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
    code, _ = client.getreply()
    return code


def replied(code: int) -> None:
    assert 200 <= code < 600, f"not an SMTP reply: {code}"


@settings(max_examples=examples(50))
@given(transaction=transactions())
def test_every_transaction_is_answered(smtp_gateway: SmtpGateway, transaction: Transaction) -> None:
    with smtplib.SMTP("127.0.0.1", smtp_gateway.port, timeout=30) as client:
        replied(client.ehlo()[0])
        if transaction.long_line:
            replied(command(client, "NOOP " + "n" * 70_000))
        replied(command(client, f"MAIL FROM:<{transaction.mail_from}>"))
        accepted = 0
        for recipient in transaction.recipients:
            code = command(client, f"RCPT TO:<{recipient}>")
            replied(code)
            accepted += code == 250
        if accepted:
            try:
                code, reply = client.data(transaction.data)
            except smtplib.SMTPDataError as exc:
                code, reply = exc.smtp_code, str(exc.smtp_error).encode()
            replied(code)
            if code == 250:
                found = re.search(rb"queued as ([0-9a-f-]{36})", reply)
                assert found, reply
                smtp_gateway.queued.append(found[1].decode())
        else:
            replied(command(client, "DATA"))
        replied(command(client, "RSET"))

    assert smtp_gateway.process.poll() is None, smtp_gateway.tail()


def queued_messages(data_dir: Path) -> dict[str, Any]:
    """The crm.email/1 messages in the embedded broker's queue, by task id."""
    found = {}
    for path in (data_dir / "broker" / "queue").glob("*.msg"):
        envelope = json.loads(path.read_text())
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        found[envelope["headers"]["id"]] = args[0]
    return found


def test_accepted_mail_is_queued_and_becomes_an_event_or_a_rejection(
    smtp_gateway: SmtpGateway, runner: IngestRunner
) -> None:
    """Runs after the fuzzing above: the gateway is up, everything it accepted is queued, and
    each queued message ends as an event or a rejection in the email task."""
    assert smtp_gateway.process.poll() is None
    with smtplib.SMTP("127.0.0.1", smtp_gateway.port, timeout=30) as client:
        reply = client.sendmail(
            "fuzz.seller@fuzz-company.example",
            ["crm@myyntitalo.fi"],
            b"From: fuzz.seller@fuzz-company.example\r\nSubject: after fuzzing\r\n\r\nmemo\r\n",
        )
        assert reply == {}
    queued = queued_messages(smtp_gateway.data_dir)
    missing = [task_id for task_id in smtp_gateway.queued if task_id not in queued]
    assert not missing, f"accepted but not queued: {missing}"
    assert len(queued) > len(smtp_gateway.queued) >= 5, "too little mail was accepted"
    large = sum("raw_ref" in message for message in queued.values())
    assert large, f"none of the {len(queued)} queued mails was over the inline limit"
    outcomes = [runner.check("email", message).outcome for message in queued.values()]
    assert "stored" in outcomes
