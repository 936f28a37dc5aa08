"""The pipeline: plain stage functions taking a Session, and thin Celery wrappers around them."""
