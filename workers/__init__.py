"""The processes: Celery app factory, base task, beat schedule, command line and gateways."""
