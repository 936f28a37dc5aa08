"""Log records carry the task, event and seller of the work in hand, in both forms."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.logging import add_to_log_context, configure_logging, log_context
from config.settings import Settings


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def capture(json_form: bool, tmp_path: Path) -> tuple[logging.Logger, io.StringIO]:
    configure_logging(Settings(data_dir=tmp_path, log_json=json_form))
    stream = io.StringIO()
    root = logging.getLogger()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    return logging.getLogger("crm.test"), stream


def test_json_records_carry_the_context_as_fields(tmp_path: Path) -> None:
    logger, stream = capture(True, tmp_path)
    with log_context(task_id="t-1", task_name="crm.ingest.call"):
        logger.warning("stored")
        add_to_log_context(event_id=42, seller="7")
        logger.warning("refreshed")
    logger.warning("outside")
    add_to_log_context(event_id=7)  # outside any block: kept nowhere
    logger.warning("still outside")
    first, second, third, fourth = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["task_id"], first["task_name"], first["message"]) == (
        "t-1",
        "crm.ingest.call",
        "stored",
    )
    assert "event_id" not in first
    assert (second["event_id"], second["seller"], second["level"]) == (42, "7", "WARNING")
    assert "task_id" not in third and third["logger"] == "crm.test"
    assert "event_id" not in fourth


def test_text_records_name_the_context_after_the_message(tmp_path: Path) -> None:
    logger, stream = capture(False, tmp_path)
    with log_context(task_id="t-2", task_name="crm.refresh.seller", seller=3):
        logger.info("done")
    logger.warning("plain")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("done [task_name=crm.refresh.seller task_id=t-2 seller=3]")
    assert lines[1].endswith("plain")
