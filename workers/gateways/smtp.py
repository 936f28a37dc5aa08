"""The SMTP/LMTP ingress gateway: its one job is to take mail for the CRM addresses off the
company's mail system and enqueue it as ``crm.email/1`` messages, losing nothing.

It validates the envelope (CRM recipients only, 550 for others; the size limit in the dialogue,
552), persists the raw bytes through the document store when they are over the inline limit,
enqueues one message, and only then answers 250. Any failure on the way answers 451, so the
sending server keeps the mail and tries again. It never parses the email: the worker does.

    crm-events smtp-gateway [--host 127.0.0.1] [--port 8025] [--lmtp]
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session
from celery import Celery
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from config.queues import EMAIL_TASK, TASK_QUEUES
from config.settings import Settings
from models.base import utcnow
from models.db import transaction
from models.schemas.email import SCHEMA
from tasks.attach import store_blob
from tasks.ingest.email import crm_tag

log = logging.getLogger(__name__)

TASK_NAME = EMAIL_TASK
SOURCE_SYSTEM = "smtp-gateway"
#: Longest envelope address the crm.email/1 message accepts (RFC 5321 allows 256 octets).
MAX_ADDRESS = 320
#: Blocking work (the database, the broker) runs in these threads, off the event loop.
WORKER_THREADS = 4
#: Publishing is retried briefly; after that the sender gets 451 and retries on its schedule.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with RFC 5321's line limit relaxed: a sloppy client's long line is
    read (the size limit still bounds the message) rather than refused with a permanent 500."""

    line_length_limit = 64 * 1024


class GatewayLMTP(LMTP):
    line_length_limit = 64 * 1024


class CrmMailHandler:
    """aiosmtpd handler: validate the envelope, then persist and enqueue each email."""

    def __init__(
        self,
        settings: Settings,
        app: Celery,
        sessions: sessionmaker[DbSession],
        executor: ThreadPoolExecutor,
        *,
        lmtp: bool = False,
    ) -> None:
        self.settings = settings
        self.app = app
        self.sessions = sessions
        self.executor = executor
        self.lmtp = lmtp

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(address) > MAX_ADDRESS or not address.isprintable():
            return "553 5.1.7 sender address not accepted"
        # "<>" (the null reverse-path of bounces) stays "<>" in the envelope, where aiosmtpd
        # needs a true value; the message carries it as "" and the worker refuses it with its
        # reason (an automatic notice is never a memo), so that it is on record.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(address) > MAX_ADDRESS or crm_tag(address, self.settings) is None:
            shown = address[:100].encode("ascii", "replace").decode("ascii")
            return f"550 5.1.1 <{shown}>: not a CRM address"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        recipients = list(envelope.rcpt_tos)
        try:
            if not raw.strip():
                return self._reply("554 5.6.0 empty message", recipients)
            loop = asyncio.get_running_loop()
            task_id = await loop.run_in_executor(
                self.executor, self.persist_and_enqueue, raw, envelope.mail_from, recipients
            )
        except Exception:
            # The broker or the database is unreachable: the sender keeps the mail and retries.
            log.exception("could not enqueue an email of %d bytes", len(raw))
            return self._reply("451 4.3.0 temporary failure, try again later", recipients)
        log.info(
            "accepted %d bytes from %r for %s as %s",
            len(raw),
            envelope.mail_from,
            recipients,
            task_id,
        )
        return self._reply(f"250 2.0.0 OK queued as {task_id}", recipients)

    def _reply(self, status: str, recipients: list[str]) -> str:
        # LMTP (RFC 2033 §4.2) answers DATA once per accepted recipient; all share one fate here.
        if self.lmtp and recipients:
            return "\r\n".join([status] * len(recipients))
        return status

    def persist_and_enqueue(self, raw: bytes, mail_from: str | None, recipients: list[str]) -> str:
        """Runs in a worker thread. Returns the task id once the broker has the message."""
        message: dict[str, Any] = {
            "schema": SCHEMA,
            "source_system": SOURCE_SYSTEM,
            "mail_from": "" if mail_from in ("<>", "") else mail_from,
            "rcpt_to": recipients,
            "received_at": utcnow().isoformat(),
        }
        if len(raw) > self.settings.email_inline_max_bytes:
            # Large mail travels by reference: the queue carries a hash, not megabytes.
            with transaction(self.sessions) as db:
                message["raw_ref"] = store_blob(db, self.settings, raw, "message/rfc822")
        else:
            message["raw_b64"] = base64.b64encode(raw).decode("ascii")
        task_id = str(uuid.uuid4())
        self.app.send_task(
            TASK_NAME,
            args=[message],
            task_id=task_id,
            queue=TASK_QUEUES[TASK_NAME],
            retry=True,
            retry_policy=PUBLISH_RETRY,
        )
        return task_id


def build_server_factory(handler: CrmMailHandler, settings: Settings, *, lmtp: bool) -> Any:
    hostname = socket.gethostname()  # not getfqdn(): no DNS lookup per connection

    def factory() -> SMTP:
        protocol = GatewayLMTP if lmtp else GatewaySMTP
        return protocol(
            handler,
            data_size_limit=settings.max_email_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="crm-events smtp-gateway",
            timeout=300,
        )

    return factory


async def serve(
    settings: Settings,
    app: Celery,
    sessions: sessionmaker[DbSession],
    *,
    host: str,
    port: int,
    lmtp: bool,
) -> None:
    """Serve until SIGTERM or SIGINT; mail being received then is finished, not cut off."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="smtp-gateway") as executor:
        handler = CrmMailHandler(settings, app, sessions, executor, lmtp=lmtp)
        server = await loop.create_server(
            build_server_factory(handler, settings, lmtp=lmtp), host=host, port=port
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        kind = "LMTP" if lmtp else "SMTP"
        addresses = ", ".join(settings.crm_addresses)
        print(f"smtp-gateway: {kind} on {host}:{port} for {addresses}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()


def run(settings: Settings, app: Celery, sessions: sessionmaker[DbSession], args: Any) -> int:
    """``crm-events smtp-gateway``: see the module docstring."""
    try:
        asyncio.run(serve(settings, app, sessions, host=args.host, port=args.port, lmtp=args.lmtp))
    except OSError as exc:  # the port is taken, the address is not ours
        print(
            f"crm-events: smtp-gateway cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0
