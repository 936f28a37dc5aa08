"""Who a request acts as, and whether it may: bearer tokens for programs, a signed session
cookie for browsers, checked in one place.

A program sends ``Authorization: Bearer TOKEN``. A browser signs in at ``/login`` with a token
(or ``/login?token=T&next=/…`` for a kiosk screen) and gets a session cookie: signed, HttpOnly,
SameSite=Lax, Secure behind https, holding the token's id (never the token) and a CSRF secret
that every form it posts must carry. The token is looked up again on every request, so revoking
it ends its sessions at once.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from models.db import transaction
from tasks.access import Principal, authenticate, principal_by_id, service_key
from workers.gateways.http.limits import Problem

COOKIE = "crm_session"
#: A browser session lasts this long without signing in again.
SESSION_MAX_AGE_S = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


class Sessions:
    """Signs and reads session cookies with the service's shared key."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._serializer: URLSafeTimedSerializer | None = None

    @property
    def serializer(self) -> URLSafeTimedSerializer:
        if self._serializer is None:
            secret = self.service.settings.session_secret
            if not secret:
                with transaction(self.service.sessions) as session:
                    secret = service_key(session, "session")
            self._serializer = URLSafeTimedSerializer(secret, salt="crm-events session")
        return self._serializer

    def issue(self, response: Response, principal: Principal, secure: bool) -> str:
        csrf = secrets.token_urlsafe(24)
        value = self.serializer.dumps({"t": principal.token_id, "c": csrf})
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_MAX_AGE_S,
            httponly=True,
            samesite="lax",
            secure=secure,
            path="/",
        )
        return csrf

    def read(self, value: str) -> dict[str, Any] | None:
        try:
            data = self.serializer.loads(value, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("t"), int):
            return None
        return data


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def identify(service: Any, request: Request) -> Principal | None:
    """The principal of a request (a bearer token first, else the session cookie), or None.

    Runs in a worker thread (it reads the database). Remembers on the request whether the
    session cookie was used, for the CSRF check of a form.
    """
    token = bearer(request)
    if token is not None:
        with transaction(service.sessions) as session:
            return authenticate(session, token)
    cookie = request.cookies.get(COOKIE)
    data = service.browser_sessions.read(cookie) if cookie else None
    if data is None:
        return None
    with service.sessions() as session:
        principal = principal_by_id(session, data["t"])
    if principal is not None:
        request.state.csrf = data.get("c")
    return principal


def require(principal: Principal | None, action: str) -> Principal:
    """401 without a principal, 403 when its scope does not allow ``action``."""
    if principal is None:
        problem = Problem(401, "a token is needed: Authorization: Bearer TOKEN")
        problem.headers["WWW-Authenticate"] = 'Bearer realm="crm-events"'
        raise problem
    if not principal.may(action):
        raise Problem(403, f"the token's scope {principal.scope!r} does not allow {action}")
    return principal


def same_secret(given: str, expected: str) -> bool:
    """Whether ``given`` is ``expected``, in constant time (a guess shows nothing of how much
    of it was right). As bytes: ``compare_digest`` refuses a ``str`` that is not ASCII, and a
    form field, a cookie or a header may hold anything."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def check_csrf(request: Request, given: str | None) -> None:
    """A state-changing request of a browser session carries the session's CSRF secret."""
    expected = getattr(request.state, "csrf", None)
    if expected is None:
        return  # a bearer token: no cookie, nothing a third-party page could ride on
    if not given or not same_secret(str(given), str(expected)):
        raise Problem(403, "the form's CSRF token is missing or wrong: reload the page")
