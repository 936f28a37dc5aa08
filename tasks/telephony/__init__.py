"""Telephony: adapters of provider formats to ``crm.call/1`` and call recordings."""
