"""The message path: kombu transports, the checking consumer, signing and compression."""
