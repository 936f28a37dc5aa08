"""The beat schedule: managers' target reports, the refresh sweep, the nightly reconcile and
retention.

The report entries tick every 15 minutes and ``crm.reports.targets`` sends only what is due in
each manager's own time zone (Monday 07:00 and the 1st at 07:00 by default, configurable with
``CRM_WEEKLY_REPORT_AT`` / ``CRM_MONTHLY_REPORT_AT``): managers in different zones each get
theirs at their local time, a tick missed while beat was down is caught up by the next one, and
the claim per (manager, kind, period) makes every further tick a no-op. Fifteen minutes also
serves zones whose offset is not a whole hour. Crontab times are in ``CRM_TIME_ZONE``.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from config.queues import RECONCILE_TASK, REFRESH_SWEEP_TASK, RETENTION_TASK, TARGET_REPORT_TASK

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "weekly-target-reports": {
        "task": TARGET_REPORT_TASK,
        "schedule": crontab(minute="*/15"),
        "args": ["weekly"],
    },
    "monthly-target-reports": {
        "task": TARGET_REPORT_TASK,
        "schedule": crontab(minute="*/15"),
        "args": ["monthly"],
    },
    "refresh-sweep": {
        "task": REFRESH_SWEEP_TASK,
        "schedule": crontab(),  # every minute
    },
    "nightly-reconcile": {
        "task": RECONCILE_TASK,
        "schedule": crontab(minute=30, hour=3),
    },
    "nightly-retention": {
        "task": RETENTION_TASK,
        "schedule": crontab(minute=0, hour=4),
    },
}
