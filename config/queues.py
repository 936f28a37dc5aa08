"""Stable task names and their queues (DESIGN §5, a contract): the one place they are spelled.

The tasks, their routes, the gateways, the command line, the imports and the batch stage take
their names from here. It sits beside the settings, below every layer that needs it (the batch
stage records each message under its task's name; the worker routes by it).
"""

from __future__ import annotations

CALL_TASK = "crm.ingest.call"
RECORDING_TASK = "crm.ingest.recording"
EMAIL_TASK = "crm.ingest.email"
VISIT_TASK = "crm.ingest.visit"
PARTY_TASK = "crm.ingest.party"
TARGET_TASK = "crm.ingest.target"
DOCUMENT_TASK = "crm.ingest.document"
WORK_TASK_TASK = "crm.ingest.task"
#: The task that takes ``crm.batch/1`` messages.
BATCH_TASK = "crm.ingest.batch"
REFRESH_SELLER_TASK = "crm.refresh.seller"
REFRESH_SWEEP_TASK = "crm.refresh.sweep"
TARGET_REPORT_TASK = "crm.reports.targets"
RECONCILE_TASK = "crm.maintenance.reconcile"
RETENTION_TASK = "crm.maintenance.retention"

CALL_QUEUE = "crm.ingest.call"
EMAIL_QUEUE = "crm.ingest.email"
VISIT_QUEUE = "crm.ingest.visit"
PARTY_QUEUE = "crm.ingest.party"
BULK_QUEUE = "crm.ingest.bulk"
REFRESH_QUEUE = "crm.refresh"
REPORTS_QUEUE = "crm.reports"
MAINTENANCE_QUEUE = "crm.maintenance"

TASK_QUEUES: dict[str, str] = {
    CALL_TASK: CALL_QUEUE,
    # Recordings fetched by URL share the call queue: they belong to a call and are few.
    RECORDING_TASK: CALL_QUEUE,
    EMAIL_TASK: EMAIL_QUEUE,
    VISIT_TASK: VISIT_QUEUE,
    PARTY_TASK: PARTY_QUEUE,
    # Targets are master data from the ERP, like parties: the same queue.
    TARGET_TASK: PARTY_QUEUE,
    # Documents added to a stored event carry bytes, as emails do: the same queue.
    DOCUMENT_TASK: EMAIL_QUEUE,
    # Work tasks are small and come from the ERP or a field app, like master data.
    WORK_TASK_TASK: PARTY_QUEUE,
    # Batches (backfills, bursts) have a queue of their own: a year of CDRs being imported
    # never holds up today's calls.
    BATCH_TASK: BULK_QUEUE,
    REFRESH_SELLER_TASK: REFRESH_QUEUE,
    REFRESH_SWEEP_TASK: REFRESH_QUEUE,
    TARGET_REPORT_TASK: REPORTS_QUEUE,
    RECONCILE_TASK: MAINTENANCE_QUEUE,
    RETENTION_TASK: MAINTENANCE_QUEUE,
}

QUEUES: tuple[str, ...] = tuple(dict.fromkeys(TASK_QUEUES.values()))

#: ``crm-events publish KIND`` and a batch's ``kind`` -> task name.
INGEST_TASKS: dict[str, str] = {
    "call": CALL_TASK,
    "email": EMAIL_TASK,
    "visit": VISIT_TASK,
    "party": PARTY_TASK,
    "target": TARGET_TASK,
    "document": DOCUMENT_TASK,
    "task": WORK_TASK_TASK,
}
