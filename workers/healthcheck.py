"""Container healthcheck: exit 0 when this host's worker answers and its pool makes progress.

Run as ``python -m workers.healthcheck`` on the worker's own host (inside its container). It asks
only ``celery@<this hostname>``, the default node name of ``crm-events worker`` (``--node``
names another), so one stuck worker is not hidden by a healthy one elsewhere. Answering a ping
is not enough: a worker whose pool has not started a message handed to it for ``--stuck-after``
seconds (60) is unhealthy too (workers/transport/pool_health.py). It needs a broker with broadcast
(Redis): the embedded filesystem broker has none, so there the check always fails.

The broker check every worker runs when it is ready is in ``workers.broker_check``.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any

from config.settings import ConfigError, load_settings

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0
#: A message handed to the pool and not started by a pool process for this long: stuck.
STUCK_AFTER_S = 60.0


def pool_problem(reply: Any, stuck_after: float) -> str | None:
    """What is wrong with a worker's pool, from its ``crm_pool`` reply
    (workers/transport/pool_health.py)."""
    if not isinstance(reply, dict):
        return f"no answer about its pool: {reply!r}"[:300]
    stuck = reply.get("stuck") or []
    if not stuck:
        return None
    oldest = stuck[0]
    return (
        f"its pool makes no progress: {len(stuck)} message(s) handed to the pool more than"
        f" {stuck_after:g} s ago were never started by a pool process (the oldest:"
        f" {oldest.get('task')} {oldest.get('id')}, {oldest.get('waiting_s')} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.healthcheck",
        description="Exit 0 when this host's worker answers and its pool makes progress.",
    )
    parser.add_argument(
        "--node",
        default=f"celery@{socket.gethostname()}",
        help="the worker's node name (default: celery@<this hostname>)",
    )
    parser.add_argument(
        "--stuck-after",
        type=float,
        default=STUCK_AFTER_S,
        metavar="SECONDS",
        help="a message handed to the pool and not started for this long means the pool is"
        f" stuck (default {STUCK_AFTER_S:g})",
    )
    args = parser.parse_args(argv)
    node = args.node
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"unhealthy: {' '.join(str(exc).split())}")
        return 1
    from workers.app import create_app

    app = create_app(settings)
    try:
        replies = app.control.ping(destination=[node], timeout=PING_TIMEOUT_S)
        if not any(node in reply for reply in replies):
            print(f"unhealthy: {node} did not answer ping within {PING_TIMEOUT_S:g} s")
            return 1
        pools = app.control.broadcast(
            "crm_pool",
            destination=[node],
            arguments={"stuck_after": args.stuck_after},
            reply=True,
            timeout=PING_TIMEOUT_S,
        )
    except Exception as exc:
        # A broker that cannot be reached is an unhealthy worker too, not a crash of the check.
        print(f"unhealthy: cannot ask {node}: {type(exc).__name__}: {exc}")
        return 1
    finally:
        app.close()
    reply = next((r[node] for r in pools if node in r), None)
    problem = pool_problem(reply, args.stuck_after)
    if problem:
        print(f"unhealthy: {node} answered ping, but {problem}")
        return 1
    print(f"healthy: {node} answered ping and its pool makes progress")
    return 0


if __name__ == "__main__":
    sys.exit(main())
