"""Ingest stages, one module per source: validate, ledger, normalise, match, classify, store."""
