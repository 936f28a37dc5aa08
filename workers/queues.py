"""Stable task names and their queues (DESIGN §5, a contract)."""

from __future__ import annotations

TASK_QUEUES: dict[str, str] = {
    "crm.ingest.call": "crm.ingest.call",
    # Recordings fetched by URL share the call queue: they belong to a call and are few.
    "crm.ingest.recording": "crm.ingest.call",
    "crm.ingest.email": "crm.ingest.email",
    "crm.ingest.visit": "crm.ingest.visit",
    "crm.ingest.party": "crm.ingest.party",
    # Targets are master data from the ERP, like parties: the same queue.
    "crm.ingest.target": "crm.ingest.party",
    # Batches (backfills, bursts) have a queue of their own: a year of CDRs being imported
    # never holds up today's calls.
    "crm.ingest.batch": "crm.ingest.bulk",
    "crm.refresh.seller": "crm.refresh",
    "crm.refresh.sweep": "crm.refresh",
    "crm.reports.targets": "crm.reports",
    "crm.maintenance.reconcile": "crm.maintenance",
}

QUEUES: tuple[str, ...] = tuple(dict.fromkeys(TASK_QUEUES.values()))

#: ``crm-events publish KIND`` -> task name.
INGEST_TASKS: dict[str, str] = {
    "call": "crm.ingest.call",
    "email": "crm.ingest.email",
    "visit": "crm.ingest.visit",
    "party": "crm.ingest.party",
    "target": "crm.ingest.target",
}

#: The task that takes ``crm.batch/1`` messages.
BATCH_TASK = "crm.ingest.batch"
