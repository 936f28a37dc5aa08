"""The claim of a seller's refresh: a change never goes untold, whichever transaction claims.

The refresh deletes its request (committed) before it reads the seller's tallies. A change that
claims in its own transaction and finds a request pending must hold that request until the
change commits, or the refresh could read the tallies without the change and nobody would tell
the screens about it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, delete, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models.base import utcnow
from models.parties import Staff
from models.targets import RefreshRequest
from tasks.store import STALE_REFRESH_REQUEST, claim_refresh


@pytest.fixture
def seller(engine: Engine) -> Iterator[int]:
    """A seller committed for the test (the claims are seen by other connections)."""
    with Session(engine) as session, session.begin():
        staff = Staff(username=f"claims-{uuid.uuid4().hex[:8]}", name="Claims Seller")
        session.add(staff)
        session.flush()
        seller_id = staff.id
    yield seller_id
    with Session(engine) as session, session.begin():
        session.execute(delete(RefreshRequest).where(RefreshRequest.seller_id == seller_id))
        session.execute(delete(Staff).where(Staff.id == seller_id))


def pending(engine: Engine, seller_id: int, age: timedelta = timedelta(0)) -> None:
    with Session(engine) as session, session.begin():
        session.add(RefreshRequest(seller_id=seller_id, requested_at=utcnow() - age))


def refresh_may_delete(engine: Engine, seller_id: int) -> bool:
    """Whether the refresh could delete the request now, without waiting for anyone."""
    with engine.connect() as other:
        try:
            other.execute(
                text("SELECT 1 FROM refresh_request WHERE seller_id = :s FOR UPDATE NOWAIT"),
                {"s": seller_id},
            )
        except OperationalError as exc:
            assert "could not obtain lock" in str(exc)
            return False
        finally:
            other.rollback()
    return True


def test_a_change_finding_a_refresh_pending_holds_it_until_it_commits(
    engine: Engine, seller: int
) -> None:
    pending(engine, seller)
    with Session(engine) as change:
        assert claim_refresh(change, seller, in_change=True) is False
        assert not refresh_may_delete(engine, seller)
        change.commit()
    assert refresh_may_delete(engine, seller)


def test_after_its_commit_a_change_only_reads_the_pending_refresh(
    engine: Engine, seller: int
) -> None:
    pending(engine, seller)
    with Session(engine) as after_commit:
        assert claim_refresh(after_commit, seller) is False
        assert refresh_may_delete(engine, seller)
        after_commit.rollback()


def test_a_stale_request_is_claimed_again_in_the_change(engine: Engine, seller: int) -> None:
    """A request older than the stale limit was lost: the change claims it (its own row now)."""
    pending(engine, seller, age=STALE_REFRESH_REQUEST + timedelta(seconds=5))
    with Session(engine) as change:
        assert claim_refresh(change, seller, in_change=True) is True
        assert not refresh_may_delete(engine, seller)
        change.commit()
    with Session(engine) as next_change:
        assert claim_refresh(next_change, seller, in_change=True) is False
        next_change.rollback()
