"""Signing a browser in and out, and what the screens share (templates, language).

``/login`` is a form for a token; ``/login?token=T&next=/sellers/anna`` signs a kiosk screen in
directly. A signed-in browser carries a session cookie (``workers.gateways.http.auth``). The
screens speak Finnish first and English on request (``?lang=en``, remembered in a cookie).
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from models.db import transaction
from tasks.access import authenticate
from workers.gateways.http.auth import COOKIE, same_secret
from workers.gateways.http.limits import Problem, form_fields, read_body

LANG_COOKIE = "crm_lang"
LOGIN_CSRF_COOKIE = "crm_login_csrf"
LANGUAGES = ("fi", "en")


def service_of(request: Request) -> Any:
    return request.app.state.service


def path_segment(value: Any) -> str:
    """``value`` as one segment of a URL's path: a username or a customer number may hold a
    space, ``?``, ``#``, ``%`` or ``/``, which would otherwise end or change the path."""
    return quote(str(value), safe="")


def same_page(request: Request, **params: str) -> str:
    """This page's path and query with ``params`` set, as a link relative to the host: the
    request's Host header is the client's to say and never makes a link of ours."""
    url = request.url.include_query_params(**params)
    return url.path + (f"?{url.query}" if url.query else "")


def environment() -> Environment:
    made = Environment(
        loader=PackageLoader("workers.gateways.http", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    made.filters["segment"] = path_segment
    made.globals["same_page"] = same_page
    return made


def language(request: Request) -> str:
    asked = request.query_params.get("lang")
    if asked in LANGUAGES:
        return asked
    remembered = request.cookies.get(LANG_COOKIE)
    return remembered if remembered in LANGUAGES else "fi"


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    lang = language(request)

    def t(en: str, fi: str) -> str:
        return fi if lang == "fi" else en

    html = (
        service_of(request)
        .templates.get_template(template)
        .render(lang=lang, t=t, request=request, **context)
    )
    response = HTMLResponse(html, status_code=status)
    if request.query_params.get("lang") in LANGUAGES:
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, samesite="lax", httponly=True)
    return response


def login_form(
    request: Request,
    target: str,
    *,
    status: int = 200,
    error: str | None = None,
    sign_in_first: bool = False,
) -> HTMLResponse:
    """The sign-in form, with the CSRF token its post must carry (also set as a cookie)."""
    csrf = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html.j2",
        status=status,
        csrf=csrf,
        next=safe_next(target),
        error=error,
        sign_in_first=sign_in_first,
    )
    response.set_cookie(LOGIN_CSRF_COOKIE, csrf, max_age=3600, httponly=True, samesite="strict")
    return response


def safe_next(target: str | None) -> str:
    """Only a path of this service: never another site (an open redirect)."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def secure_cookies(request: Request) -> bool:
    settings = service_of(request).settings
    return request.url.scheme == "https" or settings.public_base_url.startswith("https://")


async def login(request: Request) -> Response:
    target = safe_next(request.query_params.get("next"))
    token = request.query_params.get("token")
    if request.method == "GET" and token:
        # A kiosk screen: the token in the address, once; the session takes over from there.
        return await sign_in(request, token, target)
    if request.method in ("GET", "HEAD"):  # HEAD: the form's headers, as for any page
        return login_form(request, target)
    body = await read_body(request, 16 * 1024)
    form = await run_in_threadpool(_form, body)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not same_secret(form.get("csrf", ""), expected):
        raise Problem(403, "the form's CSRF token is missing or wrong: reload the page")
    return await sign_in(request, form.get("token", ""), safe_next(form.get("next")))


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(400, f"unreadable form: {exc}") from exc
    return dict(form_fields(text, 10))


async def sign_in(request: Request, token: str, target: str) -> Response:
    service = service_of(request)

    def check() -> Any:
        with transaction(service.sessions) as session:
            return authenticate(session, token.strip())

    principal = await run_in_threadpool(check)
    if principal is None:
        lang = language(request)
        error = "Tuntematon tai peruttu avain." if lang == "fi" else "Unknown or revoked token."
        return login_form(request, target, status=401, error=error)
    response = RedirectResponse(target, status_code=303)
    await run_in_threadpool(
        service.browser_sessions.issue, response, principal, secure_cookies(request)
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


ROUTES = [
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
]
