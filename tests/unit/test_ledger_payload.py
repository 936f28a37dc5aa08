"""What a ledger row keeps of a message that did not become an event: storable whatever it
holds, bounded, and whole again for a replay."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlalchemy.orm import Session

from config.settings import Settings
from models.schemas.common import unstorable_values
from tasks.ledger import (
    MAX_KEPT_DEPTH,
    PAYLOAD_KEEP_CHARS,
    json_safe,
    kept_by_reference,
    kept_payload,
    whole_payload,
)


def test_a_small_payload_is_kept_as_it_is(db: Session, settings: Settings) -> None:
    message = {"schema": "crm.call/1", "note": "Soita takaisin"}
    assert kept_payload(db, settings, message) == message
    assert whole_payload(db, settings, message) == message


def test_a_large_payload_keeps_a_prefix_its_size_and_hash(db: Session, settings: Settings) -> None:
    message = {"schema": "crm.email/1", "raw_b64": "QUJD" * 200_000}  # 800 kB of base64
    kept = kept_payload(db, settings, message)
    assert kept_by_reference(kept)
    data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    assert kept["payload_size"] == len(data)
    assert kept["payload_sha256"] == hashlib.sha256(data).hexdigest()
    assert len(kept["payload_prefix"]) == PAYLOAD_KEEP_CHARS
    assert len(json.dumps(kept)) < 2 * PAYLOAD_KEEP_CHARS  # not the 800 kB
    assert whole_payload(db, settings, kept) == message  # from the document store


def test_anything_a_sender_put_in_is_made_storable() -> None:
    deep: Any = "x"
    for _ in range(5_000):
        deep = [deep]
    safe = json_safe({"nul": "a\x00b", "lone": "\ud800", "nan": float("nan"), "deep": deep})
    assert not unstorable_values(safe)
    assert safe["nul"] == "a\u2400b" and safe["nan"] == "nan"
    level, depth = safe["deep"], 1
    while isinstance(level, list):
        level, depth = level[0], depth + 1
    assert depth <= MAX_KEPT_DEPTH + 1 and isinstance(level, str)


def test_a_payload_whose_bytes_are_gone_says_so(db: Session, settings: Settings) -> None:
    kept = {"payload_sha256": "0" * 64, "payload_size": 10, "payload_prefix": "{"}
    with pytest.raises(LookupError, match="no longer stored"):
        whole_payload(db, settings, kept)
