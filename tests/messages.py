"""Message builders shared by the tests: one place for the shape of a typical message."""

from __future__ import annotations

import uuid
from typing import Any


def outbound_call(
    call_id: str, started_at: str, agent: str = "anna", **fields: Any
) -> dict[str, Any]:
    """A completed outbound crm.call/1 from extension 201 to contact Liisa Korhonen (10001)."""
    return {
        "schema": "crm.call/1",
        "source_system": "pbx-hki",
        "call_id": call_id,
        "status": "completed",
        "direction": "outbound",
        "from": "201",
        "to": "+358 44 765 4321",
        "agent": agent,
        "started_at": started_at,
        **fields,
    }


def unlinked_call(prefix: str, **fields: Any) -> dict[str, Any]:
    """A valid missed call from a number no one in the tests' world has: stored unlinked, it
    touches no seller's tallies."""
    return {
        "schema": "crm.call/1",
        "source_system": "envelope-test",
        "call_id": f"{prefix}-{uuid.uuid4().hex[:10]}",
        "status": "missed",
        "direction": "inbound",
        "from": "+358 40 900 0071",
        "started_at": "2026-11-24T16:58:30+02:00",
        **fields,
    }
