"""Message builders shared by the tests: one place for the shape of a typical message."""

from __future__ import annotations

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
