"""Signed messages and secrets, with real processes: a worker, the HTTP and SMTP gateways, the CLI.

A worker of its own (its own Redis database, so it takes none of the session worker's
messages) runs with message signing on and every secret set, at DEBUG. Signed messages from
the command line and from both gateways are processed; an unsigned message, or one signed by
a key the worker does not trust, is refused and recorded. No secret appears in any process's
output.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import re
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.engine import make_url

from config.settings import Settings
from models.ledger import RejectedMessage
from tests.conftest import ROOT, claim_first_free
from tests.integration.conftest import LiveSystem
from tests.processes import free_port, run_cli, stop_process
from workers.app import create_app
from workers.gateways.http.webhooks import twilio_signature
from workers.publish import wait_for

pytestmark = pytest.mark.integration

DATABASE_PASSWORD = "pg-Pw-5f1d0c9e7a"
SMTP_PASSWORD = "smtp-Pw-83b1e2f4c6"
WEBHOOK_SECRET = "hook-Secret-0a9b8c7d6e"
TWILIO_TOKEN = "twilio-Token-1f2e3d4c5b"
FLOWER_PASSWORD = "flower-Pw-6a5b4c3d2e"
PUBLIC_URL = "https://crm.example.fi/telephony"
INSPECT_CONF = """
import json
from config.settings import load_settings
from workers.app import create_app
print(json.dumps(create_app(load_settings()).control.inspect(timeout=10).conf()))
"""


def make_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """A private key and a self-signed certificate, as docs/security.md tells how to make."""
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def claim_second_redis_database(session_url: str) -> str:
    """Another Redis database on the session's server, claimed as tests/conftest.py claims."""
    base = make_url(session_url.replace("redis://", "postgresql://", 1))
    urls = [f"redis://{base.host}:{base.port or 6379}/{index}" for index in range(15, -1, -1)]
    url = claim_first_free([u for u in urls if u != session_url])
    if url is None:
        raise RuntimeError("no free Redis database for the signing worker")
    return url


@dataclass
class SecureSystem:
    env: dict[str, str]
    settings: Settings
    folder: Path
    worker: subprocess.Popen[bytes]
    logs: list[Path] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.folder / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as handle:
            return subprocess.Popen(
                [sys.executable, "-m", "workers.cli", *args],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = run_cli(env or self.env, *args)
        self.outputs.append(result.stdout + result.stderr)
        return result

    def worker_log(self) -> str:
        return (self.folder / "worker.log").read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def secure(live: LiveSystem, redis_database: str, tmp_path_factory: Any) -> Iterator[SecureSystem]:
    folder = tmp_path_factory.mktemp("secure")
    key, cert = make_identity(folder / "keys", "crm-worker")
    store = folder / "trusted"
    store.mkdir()
    (store / cert.name).write_bytes(cert.read_bytes())
    broker = claim_second_redis_database(redis_database)
    # PostgreSQL's trust authentication accepts any password: the URL carries one all the same.
    database_url = (
        make_url(live.settings.database_url)
        .set(password=DATABASE_PASSWORD)
        .render_as_string(hide_password=False)
    )
    env = {
        **live.env,
        "CRM_DATABASE_URL": database_url,
        "CRM_BROKER_URL": broker,
        "CRM_REDIS_URL": broker,
        "CRM_DATA_DIR": str(folder / "var"),
        "CRM_LOG_LEVEL": "DEBUG",
        "CRM_SMTP_USER": "reports",
        "CRM_SMTP_PASSWORD": SMTP_PASSWORD,
        "CRM_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "CRM_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "CRM_PUBLIC_BASE_URL": PUBLIC_URL,
        "CRM_FLOWER_BASIC_AUTH": f"admin:{FLOWER_PASSWORD}",
        "CRM_SIGNING_KEY": str(key),
        "CRM_SIGNING_CERT": str(cert),
        "CRM_SIGNING_CERT_STORE": str(store),
    }
    settings = Settings(
        data_dir=folder / "var", database_url=live.settings.database_url, broker_url=broker
    )
    system = SecureSystem(env, settings, folder, worker=None)  # type: ignore[arg-type]
    system.worker = system.start(
        "worker", "worker", "--concurrency", "1", "--hostname", f"signed-{uuid.uuid4().hex[:6]}@%h"
    )
    deadline = time.monotonic() + 60
    while " ready." not in (folder / "worker.log").read_text(errors="replace"):
        assert system.worker.poll() is None, f"worker exited:\n{system.worker_log()}"
        assert time.monotonic() < deadline, f"worker not ready:\n{system.worker_log()}"
        time.sleep(0.2)
    try:
        yield system
    finally:
        stop_process(system.worker)
        client = redis.Redis.from_url(broker, socket_timeout=5)
        client.flushdb()  # also drops the claim
        client.close()


def call_message(call_id: str) -> dict[str, Any]:
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-sec",
        "call_id": call_id,
        "sequence": 1,
        "status": "completed",
        "direction": "inbound",
        "from": "040 555 0101",
        "to": "+358 9 111 000",
        "started_at": "2026-11-23T10:00:00+02:00",
    }


def publish_file(secure: SecureSystem, message: Any, env: dict[str, str] | None = None) -> Any:
    path = secure.folder / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(message))
    result = secure.cli("publish", "call", str(path), "--wait", "60", "--json", env=env)
    assert result.returncode == 0, result.stderr + secure.worker_log()
    return json.loads(result.stdout)


def test_signed_message_from_the_command_line_is_processed(secure: SecureSystem) -> None:
    (row,) = publish_file(secure, call_message(f"signed-{uuid.uuid4().hex[:8]}"))
    assert row["outcome"] == "stored", row


def test_unsigned_message_is_refused_and_recorded(secure: SecureSystem, live: LiveSystem) -> None:
    unsigned = create_app(secure.settings)  # the same broker, without the signing key
    task_id = str(uuid.uuid4())
    unsigned.send_task(
        "crm.ingest.call",
        args=[call_message(f"unsigned-{uuid.uuid4().hex[:8]}")],
        task_id=task_id,
        queue="crm.ingest.call",
    )
    done = wait_for(live.sessions, [task_id], 60)
    assert task_id in done, secure.worker_log()
    assert done[task_id].outcome == "rejected"
    row = live.rejected(task_id)
    assert "application/json" in row.reason and "only signed messages" in row.reason
    assert row.task_name == "crm.ingest.call"


def test_message_signed_by_an_untrusted_key_is_refused(
    secure: SecureSystem, live: LiveSystem
) -> None:
    key, cert = make_identity(secure.folder / "stranger", "stranger")
    env = {**secure.env, "CRM_SIGNING_KEY": str(key), "CRM_SIGNING_CERT": str(cert)}
    (row,) = publish_file(secure, call_message(f"stranger-{uuid.uuid4().hex[:8]}"), env=env)
    assert row["outcome"] == "rejected"
    assert "signature could not be verified" in live.rejected(row["task_id"]).reason


def wait_started(log: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + 30
    while True:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert process.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)


def http_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_gateways_sign_and_no_secret_is_ever_logged(secure: SecureSystem, live: LiveSystem) -> None:
    http_gateway = secure.start("http-gateway", "http-gateway", "--port", "0")
    smtp_port = free_port()
    smtp_gateway = secure.start("smtp-gateway", "smtp-gateway", "--port", str(smtp_port))
    try:
        found = wait_started(
            secure.folder / "http-gateway.log",
            r"listening on http://127\.0\.0\.1:(\d+)",
            http_gateway,
        )
        port = int(found[1])
        wait_started(secure.folder / "smtp-gateway.log", r"smtp-gateway: SMTP on", smtp_gateway)

        status, answer = http_post(
            port,
            "/calls",
            json.dumps(call_message(f"http-{uuid.uuid4().hex[:8]}")).encode(),
            {"Content-Type": "application/json", "X-CRM-Webhook-Secret": WEBHOOK_SECRET},
        )
        assert status == 200, answer
        task_ids = list(answer["task_ids"])

        fields = {
            "CallSid": f"CA{uuid.uuid4().hex}",
            "CallStatus": "completed",
            "Direction": "inbound",
            "From": "+358405550102",
            "To": "+35891110000",
            "Timestamp": "Mon, 23 Nov 2026 08:00:00 +0000",
            "CallDuration": "42",
        }
        signature = twilio_signature(TWILIO_TOKEN, PUBLIC_URL + "/twilio/status", fields.items())
        status, answer = http_post(
            port,
            "/twilio/status",
            urlencode(fields).encode(),
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": signature,
            },
        )
        assert status == 200, answer
        task_ids += answer["task_ids"]

        mail = EmailMessage()
        mail["From"] = "Anna Myyjä <anna@myyntitalo.fi>"
        mail["To"] = "crm@myyntitalo.fi"
        mail["Subject"] = "Muistio"
        mail["Message-ID"] = f"<{uuid.uuid4().hex}@myyntitalo.fi>"
        mail.set_content("Tapasin asiakkaan.")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.send_message(mail)
        queued = re.findall(
            r"queued as ([0-9a-f-]{36})",
            (secure.folder / "smtp-gateway.log").read_text(errors="replace"),
        )
        task_ids += queued
        assert len(queued) == 1

        done = wait_for(live.sessions, task_ids, 60)
        assert set(done) == set(task_ids), secure.worker_log()
        # Signed by the gateways: processed, none refused for want of a signature.
        assert {done[t].outcome for t in task_ids[:2]} <= {"stored", "duplicate"}
        with live.sessions() as session:
            reasons = session.scalars(
                select(RejectedMessage.reason).where(RejectedMessage.task_id.in_(task_ids))
            ).all()
        assert not [r for r in reasons if "signed" in r or "signature" in r], reasons
    finally:
        stop_process(http_gateway)
        stop_process(smtp_gateway)

    for args in (("rejected", "--json"), ("failed", "--json"), ("init-db", "--json"), ("--help",)):
        secure.cli(*args)
    # What anyone on the broker can ask a worker for: its configuration (`celery inspect conf`).
    inspect = subprocess.run(
        [sys.executable, "-c", INSPECT_CONF],
        env=secure.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert "crm_settings" in inspect.stdout, inspect.stdout + inspect.stderr
    secure.outputs.append(inspect.stdout + inspect.stderr)

    secrets = {
        "database password": DATABASE_PASSWORD,
        "SMTP password": SMTP_PASSWORD,
        "webhook secret": WEBHOOK_SECRET,
        "Twilio token": TWILIO_TOKEN,
        "Flower password": FLOWER_PASSWORD,
    }
    key_lines = [
        line
        for line in Path(secure.env["CRM_SIGNING_KEY"]).read_text().splitlines()
        if not line.startswith("-----")
    ]
    secrets.update({f"signing key line {i}": line for i, line in enumerate(key_lines)})
    texts = {log.name: log.read_text(errors="replace") for log in secure.logs}
    texts.update({f"command output {i}": out for i, out in enumerate(secure.outputs)})
    assert "DEBUG" in texts["worker.log"]  # the level that tells the most was on
    leaks = [
        f"{what} in {where}"
        for where, text in texts.items()
        for what, secret in secrets.items()
        if secret in text
    ]
    assert not leaks, leaks


def flower_tasks(port: int) -> dict[str, Any]:
    credentials = base64.b64encode(f"admin:{FLOWER_PASSWORD}".encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "GET", "/api/tasks?limit=1000", headers={"Authorization": f"Basic {credentials}"}
        )
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200, body
    tasks: dict[str, Any] = json.loads(body)
    return tasks


def test_flower_and_the_debug_log_show_an_email_by_kind_and_source_only(
    secure: SecureSystem,
) -> None:
    """A processed email appears in Flower's task list and the worker's DEBUG log as
    "crm.email/1 from …" and its size: no address, name, subject or text of it, in any form."""
    port = free_port()
    flower = secure.start("flower", "flower", f"--port={port}", "--address=127.0.0.1")
    try:
        deadline = time.monotonic() + 120
        while True:  # Flower asks for task events once it runs: the next email is listed
            assert flower.poll() is None, (secure.folder / "flower.log").read_text()
            raw = (ROOT / "examples/emails/bcc-offer-with-pdf.eml").read_bytes()
            raw = raw.replace(b"<offer-2026-118@", f"<offer-{uuid.uuid4().hex}@".encode())
            path = secure.folder / f"{uuid.uuid4().hex}.eml"
            path.write_bytes(raw)
            result = secure.cli("publish", "email", str(path), "--wait", "60", "--json")
            assert result.returncode == 0, result.stderr + secure.worker_log()
            (row,) = json.loads(result.stdout)
            assert row["outcome"] == "stored", row
            try:
                task = flower_tasks(port).get(row["task_id"])
            except OSError:
                task = None  # not listening yet
            if task is not None and task.get("args"):
                break
            assert time.monotonic() < deadline, "the email is not in Flower's task list"
    finally:
        stop_process(flower)
    assert task["args"].startswith("(crm.email/1 from "), task
    assert "raw_b64 of " in task["args"], task
    shown = json.dumps(task) + (secure.folder / "worker.log").read_text(errors="replace")
    body = base64.b64encode(raw).decode()
    for personal in (
        "matti.virtanen",
        "Matti Virtanen",
        "Virtanen",
        "anna.lahtinen@",
        "huoltosopimus",
        body[200:260],
    ):
        assert personal not in shown, personal
