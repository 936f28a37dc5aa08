"""The beat schedule: managers' reports and the nightly reconcile (times in the configured zone)."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "weekly-target-reports": {
        "task": "crm.reports.targets",
        "schedule": crontab(minute=0, hour=7, day_of_week="mon"),
        "args": ["weekly"],
    },
    "monthly-target-reports": {
        "task": "crm.reports.targets",
        "schedule": crontab(minute=0, hour=7, day_of_month="1"),
        "args": ["monthly"],
    },
    "nightly-reconcile": {
        "task": "crm.maintenance.reconcile",
        "schedule": crontab(minute=30, hour=3),
    },
}
