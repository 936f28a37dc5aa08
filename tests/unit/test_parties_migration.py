"""The master-data migration keeps existing contacts' addresses matching, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text

from config.settings import Settings
from models.db import create_db_engine
from models.migrate import alembic_config, upgrade
from tests.conftest import TemporaryDatabase


@pytest.fixture(params=["postgresql", "sqlite"])
def engine_at_0001(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    database = TemporaryDatabase("migration") if request.param == "postgresql" else None
    settings = (
        Settings(data_dir=tmp_path, database_url=database.url)
        if database
        else Settings.embedded(tmp_path)
    )
    engine = create_db_engine(settings)
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0001")
    try:
        yield engine
    finally:
        engine.dispose()
        if database:
            database.drop()


def test_existing_contacts_addresses_are_copied(engine_at_0001: Engine) -> None:
    with engine_at_0001.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO customer (id, customer_number, name, placeholder, updated_at)"
                " VALUES (1, '10001', 'Pohjolan Kone Oy', false, CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO contact (id, customer_id, contact_key, name, email, updated_at) VALUES"
                " (1, 1, 'matti@pk.fi', 'Matti', 'Matti@PK.fi', CURRENT_TIMESTAMP),"
                " (2, 1, 'name:Liisa', 'Liisa', NULL, CURRENT_TIMESTAMP)"
            )
        )
    upgrade(engine_at_0001)
    with engine_at_0001.connect() as connection:
        rows = connection.execute(
            text("SELECT contact_id, email FROM contact_email ORDER BY contact_id")
        ).all()
    assert [tuple(r) for r in rows] == [(1, "matti@pk.fi")]
