"""The targets there are when target changes start being kept become their first changes."""

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


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_existing_targets_become_their_first_changes(database: str, tmp_path: Path) -> None:
    scratch = TemporaryDatabase("targets") if database == "postgresql" else None
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
            command.upgrade(cfg, "0008_incremental_tallies")
        with engine.begin() as connection:
            with Session(bind=connection) as session:
                install_default_catalogue(session)
                session.flush()
            connection.execute(
                text(
                    "INSERT INTO staff (id, username, name, role, time_zone, active, placeholder,"
                    " updated_at) VALUES (1, 'anna', 'Anna', 'seller', 'Europe/Helsinki', true,"
                    " false, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO target (seller_id, category_code, kind, value, valid_from,"
                    " source_system, created_at) VALUES (1, 'sales_action', 'weekly', 5,"
                    " '2026-11-02', 'erp', '2026-11-01 08:00:00+00:00')"
                )
            )
        upgrade(engine)
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT seller_id, category_code, kind, old_value, new_value, changed_by"
                    " FROM target_change"
                )
            ).all()
        assert [tuple(r) for r in rows] == [(1, "sales_action", "weekly", None, 5, "erp")]
    finally:
        engine.dispose()
        if scratch:
            scratch.drop()
