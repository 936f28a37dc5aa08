"""Every message of CPython's own email test corpus through the email stage.

The corpus (``test/test_email/data/msg_*.txt`` of the running interpreter) is a collection of
odd, old and broken messages. Each must end as an event or as a rejection with a reason — the
two outcomes a worker records — and never as any other exception.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tasks.context import StageContext
from tasks.errors import BadInput
from tasks.ingest.email import ingest_email
from tests.unit.test_samples_emails import documents, event_json, wrap


def corpus_folder() -> Path:
    """The corpus of this interpreter; the base interpreter's when a venv hides the package."""
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix]):
        lib = Path(prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        folder = lib / "test" / "test_email" / "data"
        if folder.is_dir():
            return folder
    raise AssertionError("CPython's email test corpus (test/test_email/data) is not installed")


CORPUS = sorted(corpus_folder().glob("msg_*.txt"))


def test_the_corpus_is_there() -> None:
    # A broken discovery must fail, not silently test nothing.
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_message_is_an_event_or_a_reasoned_rejection(
    world: Session, ctx: StageContext, path: Path
) -> None:
    raw = path.read_bytes()
    with world.begin_nested() as savepoint:
        try:
            result = ingest_email(world, ctx, wrap(raw, ctx))
        except BadInput as exc:
            savepoint.rollback()
            assert exc.reason.strip(), f"{path.name}: rejected without a reason"
            return
    assert result.outcome in {"stored", "duplicate"}, result
    assert result.event_id is not None
    event = event_json(world, result.event_id, ctx)
    # Nothing lost: the raw bytes are kept as a document whatever could be read.
    (raw_document,) = documents(event, "raw_message")
    assert raw_document["size"] == len(raw)
