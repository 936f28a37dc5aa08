"""Container healthcheck: exit 0 when this host's worker answers a Celery ping, 1 otherwise.

Run as ``python -m workers.healthcheck`` on the worker's own host (inside its container). It pings
only ``celery@<this hostname>``, the default node name of ``crm-events worker``, so one stuck
worker is not hidden by a healthy one elsewhere. It needs a broker with broadcast (Redis): the
embedded filesystem broker has none, so there the check always fails.
"""

from __future__ import annotations

import socket
import sys

from config.settings import ConfigError, load_settings
from workers.app import create_app

PING_TIMEOUT_S = 5.0


def main() -> int:
    node = f"celery@{socket.gethostname()}"
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"unhealthy: {' '.join(str(exc).split())}")
        return 1
    app = create_app(settings)
    try:
        replies = app.control.ping(destination=[node], timeout=PING_TIMEOUT_S)
    except Exception as exc:
        # A broker that cannot be reached is an unhealthy worker too, not a crash of the check.
        print(f"unhealthy: cannot ping {node}: {type(exc).__name__}: {exc}")
        return 1
    finally:
        app.close()
    if any(node in reply for reply in replies):
        print(f"healthy: {node} answered ping")
        return 0
    print(f"unhealthy: {node} did not answer ping within {PING_TIMEOUT_S:g} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
