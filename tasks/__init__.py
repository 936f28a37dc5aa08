"""The pipeline: plain stage functions taking a Session (the Celery tasks: workers/pipeline.py)."""
