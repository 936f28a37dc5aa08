"""Models and migrations agree, on PostgreSQL and on the embedded SQLite."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from config.settings import Settings
from models.migrate import schema_drift
from tests.conftest import migrated


def test_postgresql_schema_matches_the_models(engine: Engine) -> None:
    assert schema_drift(engine) == []


def test_sqlite_schema_matches_the_models(tmp_path: Path) -> None:
    sqlite_engine = migrated(Settings.embedded(tmp_path))
    try:
        assert schema_drift(sqlite_engine) == []
    finally:
        sqlite_engine.dispose()
