"""Events stored before the CRM status existed get one: done, a stored meeting scheduled, and
a cancelled visit or meeting cancelled."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.orm import Session

from config.settings import Settings
from models.db import create_db_engine
from models.migrate import alembic_config, install_default_catalogue, upgrade
from tests.conftest import TemporaryDatabase

EVENTS = [("c-1", "call", False), ("m-1", "meeting", False), ("m-2", "meeting", True)]
EVENTS += [("v-1", "visit", True), ("v-2", "visit", False)]


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_stored_events_get_their_state(database: str, tmp_path: Path) -> None:
    scratch = TemporaryDatabase("states") if database == "postgresql" else None
    settings = (
        Settings(data_dir=tmp_path, database_url=scratch.url)
        if scratch
        else Settings.embedded(tmp_path)
    )
    engine = create_db_engine(settings)
    try:
        cfg = alembic_config(engine)
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0011_project_offer")
        with engine.begin() as connection:
            with Session(bind=connection) as session:
                install_default_catalogue(session)
                session.flush()
            for source_id, kind, cancelled in EVENTS:
                connection.execute(
                    text(
                        "INSERT INTO crm_event (source_system, source_kind, source_id,"
                        " link_state, linked_by, match_note, candidates, category_code,"
                        " class_code, type_code, classification_note, subject, body,"
                        " occurred_at, cancelled, details, created_at, updated_at) VALUES"
                        " ('app', :kind, :id, 'unlinked', '', '', '[]', 'crm_event', 'events',"
                        " 'crm_event', '', '', '', '2026-11-02 08:00:00+00:00', :cancelled, '{}',"
                        " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"kind": kind, "id": source_id, "cancelled": cancelled},
                )
        upgrade(engine)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT source_id, state FROM crm_event")).all()
        assert dict(rows) == {
            "c-1": "done",
            "m-1": "scheduled",
            "m-2": "cancelled",
            "v-1": "cancelled",
            "v-2": "done",
        }
    finally:
        engine.dispose()
        if scratch:
            scratch.drop()
