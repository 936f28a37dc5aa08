"""API tokens: create (shown once), list, revoke, and check one a request presents."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.access import SCOPES, ApiToken, ServiceKey
from models.base import utcnow
from models.db import upsert_insert
from models.invalid import BadInput
from models.parties import Staff

#: What each scope may do. ``admin`` may do everything.
GRANTS = {
    "ingest": {"ingest"},
    "read": {"read"},
    "admin": {"ingest", "read", "admin"},
}
#: A token's last use is written at most this often (not once per request).
LAST_USED_EVERY = timedelta(minutes=1)
TOKEN_PREFIX = "crm_"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the token's name, scope and staff member."""

    token_id: int
    name: str
    scope: str
    staff: str | None

    def may(self, action: str) -> bool:
        return action in GRANTS.get(self.scope, set())


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(
    session: Session, name: str, scope: str, staff: str | None = None
) -> tuple[ApiToken, str]:
    """A new token: the row (its hash only) and the token itself, to be shown once."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise BadInput("a token's name is 1-100 printable characters")
    if scope not in SCOPES:
        raise BadInput(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise BadInput(f"a token named {name!r} exists; revoke it first or choose another name")
    staff_id = None
    if staff:
        staff_id = session.scalar(select(Staff.id).where(Staff.username == staff))
        if staff_id is None:
            raise BadInput(f"no staff member {staff!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, scope=scope, staff_id=staff_id, token_sha256=token_digest(token))
    session.add(row)
    session.flush()
    return row, token


def list_tokens(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(ApiToken, Staff.username)
        .outerjoin(Staff, Staff.id == ApiToken.staff_id)
        .order_by(ApiToken.name)
    ).all()
    return [
        {
            "name": token.name,
            "scope": token.scope,
            "staff": username,
            "created_at": token.created_at.isoformat(),
            "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
        }
        for token, username in rows
    ]


def revoke_token(session: Session, name: str) -> None:
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise BadInput(f"no token named {name!r}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()


def authenticate(session: Session, presented: str, now: datetime | None = None) -> Principal | None:
    """The principal of a presented token, or None for an unknown or revoked one."""
    if not presented.startswith(TOKEN_PREFIX) or len(presented) > 200:
        return None
    digest = token_digest(presented)
    row = session.execute(
        select(ApiToken, Staff.username)
        .outerjoin(Staff, Staff.id == ApiToken.staff_id)
        .where(ApiToken.token_sha256 == digest)
    ).first()
    if row is None:
        return None
    token, username = row
    # The index found it; compare in constant time all the same.
    if token.revoked_at is not None or not hmac.compare_digest(token.token_sha256, digest):
        return None
    now = now or utcnow()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_EVERY:
        session.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
    return Principal(token.id, token.name, token.scope, username)


def principal_by_id(session: Session, token_id: int) -> Principal | None:
    """The principal of a browser session's token, while the token is not revoked."""
    row = session.execute(
        select(ApiToken, Staff.username)
        .outerjoin(Staff, Staff.id == ApiToken.staff_id)
        .where(ApiToken.id == token_id)
    ).first()
    if row is None or row[0].revoked_at is not None:
        return None
    token, username = row
    return Principal(token.id, token.name, token.scope, username)


def service_key(session: Session, name: str) -> str:
    """The shared secret ``name``, made on first use (a race between replicas keeps one)."""
    existing = session.get(ServiceKey, name)
    if existing is not None:
        return existing.value
    statement = upsert_insert(session, ServiceKey.__table__).values(
        name=name, value=secrets.token_urlsafe(48), created_at=utcnow()
    )
    session.execute(statement.on_conflict_do_nothing(index_elements=["name"]))
    value = session.scalar(select(ServiceKey.value).where(ServiceKey.name == name))
    assert value is not None
    return value
