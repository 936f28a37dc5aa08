"""Pooled connections: the tasks' pinged before use after a rest, not between the transactions
of a busy process, everyone else's before every use; a connection the server closed is replaced
either way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from config.settings import Settings
from models.db import create_db_engine


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT pg_backend_pid()")))


def terminate(engine: Engine, pid: int) -> None:
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


@pytest.fixture
def admin(settings: Settings) -> Iterator[Engine]:
    """A second engine, so the one under test keeps its one pooled connection to itself."""
    engine = create_db_engine(settings)
    yield engine
    engine.dispose()


def pooled(settings: Settings, ping_after_rest_s: float | None) -> Engine:
    return create_db_engine(settings, ping_after_rest_s=ping_after_rest_s, pool_size=1)


@pytest.mark.parametrize(
    "ping_after_rest_s",
    [None, 0.0],  # the default: before every use; a task's, with every reuse after a rest
    ids=["pinged before every use", "pinged after a rest"],
)
def test_a_rested_connection_that_the_server_closed_is_replaced_before_use(
    settings: Settings, admin: Engine, ping_after_rest_s: float | None
) -> None:
    engine = pooled(settings, ping_after_rest_s)
    try:
        first = backend_pid(engine)
        terminate(admin, first)
        # The ping finds the connection dead: a new one serves the transaction, no error.
        second = backend_pid(engine)
        assert second != first
        assert backend_pid(engine) == second  # and is pooled in its turn
    finally:
        engine.dispose()


def test_a_busy_connection_is_not_pinged_and_a_dead_one_fails_once_then_is_replaced(
    settings: Settings, admin: Engine
) -> None:
    engine = pooled(settings, ping_after_rest_s=3600.0)  # never rested long enough
    try:
        first = backend_pid(engine)
        terminate(admin, first)
        # Unpinged, the dead connection meets the transaction: a transient error for the task,
        # which retries; SQLAlchemy has replaced the pool's connections by then.
        with pytest.raises(OperationalError):
            backend_pid(engine)
        assert backend_pid(engine) != first
    finally:
        engine.dispose()
