"""A failed statement's error names the statement, never the values it was given: an error goes
to a log, a failure's record and a 500's trace, and the values are a message's contents."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from config.settings import load_settings
from models.db import create_db_engine


def test_a_failed_statement_does_not_carry_its_values(tmp_path: Path) -> None:
    engine = create_db_engine(load_settings({"CRM_DATA_DIR": str(tmp_path)}))
    with pytest.raises(OperationalError) as failed, engine.connect() as connection:
        connection.execute(text("SELECT * FROM nowhere WHERE name = :name"), {"name": "Matti V"})
    assert "nowhere" in str(failed.value)
    assert "Matti V" not in str(failed.value)
