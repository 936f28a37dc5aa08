"""The move to incremental tallies recounts what was still waiting for a refresh, on both
databases, so the first moved count starts from the right number."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session

from config.settings import Settings
from models.db import create_db_engine
from models.migrate import alembic_config, install_default_catalogue, upgrade
from tests.conftest import TemporaryDatabase


@pytest.fixture(params=["postgresql", "sqlite"])
def engine_at_0007(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    database = TemporaryDatabase("tallies") if request.param == "postgresql" else None
    settings = (
        Settings(data_dir=tmp_path, database_url=database.url)
        if database
        else Settings.embedded(tmp_path)
    )
    engine = create_db_engine(settings)
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0007_api_tokens")
    with Session(engine) as session, session.begin():
        install_default_catalogue(session)
    try:
        yield engine
    finally:
        engine.dispose()
        if database:
            database.drop()


def test_pending_touches_are_recounted_and_the_old_tables_go(engine_at_0007: Engine) -> None:
    events = [
        # Two calls on Monday 30 November in Helsinki, one a minute after midnight local time
        # (still Sunday 29 November in UTC), one cancelled.
        ("c-1", "2026-11-29 22:01:00", False),
        ("c-2", "2026-11-30 08:00:00", False),
        ("c-3", "2026-11-30 09:00:00", True),
    ]
    with engine_at_0007.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO staff (id, username, name, role, time_zone, active, placeholder,"
                " updated_at) VALUES (1, 'anna', 'Anna', 'seller', 'Europe/Helsinki', true,"
                " false, CURRENT_TIMESTAMP)"
            )
        )
        for source_id, occurred, cancelled in events:
            connection.execute(
                text(
                    "INSERT INTO crm_event (source_system, source_kind, source_id, seller_id,"
                    " link_state, linked_by, match_note, candidates, category_code, class_code,"
                    " type_code, classification_note, subject, body, occurred_at, cancelled,"
                    " details, created_at, updated_at) VALUES ('pbx', 'call', :id, 1,"
                    " 'unlinked', 'auto', '', '[]', 'crm_event', 'events', 'crm_event', '', '',"
                    " '', :at, :cancelled, '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"id": source_id, "at": occurred + "+00:00", "cancelled": cancelled},
            )
        # A refresh was on its way: the week's tally is stale, the month's missing.
        connection.execute(
            text(
                "INSERT INTO tally (seller_id, category_code, period, count, updated_at)"
                " VALUES (1, 'crm_event', '2026-W49', 1, CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO tally_touch (seller_id, category_code, period, created_at) VALUES"
                " (1, 'crm_event', '2026-W49', CURRENT_TIMESTAMP),"
                " (1, 'crm_event', '2026-11', CURRENT_TIMESTAMP)"
            )
        )
    upgrade(engine_at_0007)
    with engine_at_0007.connect() as connection:
        rows = connection.execute(
            text("SELECT period, count FROM tally WHERE seller_id = 1 ORDER BY period")
        ).all()
    assert [tuple(row) for row in rows] == [("2026-11", 2), ("2026-W49", 2)]
    tables = set(inspect(engine_at_0007).get_table_names())
    assert "seller_view" in tables and not tables & {"tally_touch", "seller_card"}
