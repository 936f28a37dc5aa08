"""What a stage function gets besides its Session and message."""

from __future__ import annotations

from dataclasses import dataclass

from config.settings import Settings


@dataclass(frozen=True)
class StageContext:
    settings: Settings
    task_id: str | None = None
    task_name: str = ""
