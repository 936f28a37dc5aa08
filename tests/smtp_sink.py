"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives, for the report tests.

It can refuse the next N messages with a temporary error (451), as a busy mail server does.
"""

from __future__ import annotations

import email
import email.policy
import ssl
import threading
import time
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.processes import free_port


class SmtpSink:
    """``tls`` (certificate and key files) makes it demand STARTTLS; ``credentials`` makes it
    demand AUTH LOGIN/PLAIN with that user and password (over TLS only)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        tls: tuple[str, str] | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._messages: list[EmailMessage] = []
        self.refuse_next = 0
        self.refused = 0
        self.logins: list[str] = []
        self._credentials = credentials
        options: dict[str, Any] = {}
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            options.update(tls_context=context, require_starttls=True)
        if credentials:
            options.update(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=True
            )
        self._controller = Controller(self, hostname=self.host, port=self.port, **options)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword) or self._credentials is None:
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        if (user, password) != self._credentials:
            return AuthResult(success=False, handled=False)
        self.logins.append(user)
        return AuthResult(success=True)

    # aiosmtpd handler hook
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            if self.refuse_next > 0:
                self.refuse_next -= 1
                self.refused += 1
                return "451 4.3.0 Mailbox temporarily unavailable, try again later"
            parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self._messages.append(parsed)
        return "250 2.0.0 OK"

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def reset(self) -> None:
        with self._lock:
            self._messages.clear()
            self.refuse_next = 0
            self.refused = 0

    def messages(self, to: str | None = None) -> list[EmailMessage]:
        with self._lock:
            return [m for m in self._messages if to is None or m["To"] == to]

    def wait_for(
        self, count: int, to: str | None = None, timeout: float = 30
    ) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(found := self.messages(to)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found
