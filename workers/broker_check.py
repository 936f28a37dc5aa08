"""The broker check every worker runs when it is ready.

A Redis broker without AOF or with an eviction policy can lose queued messages; the worker says
so in a WARNING that names the setting (docs/operations.md, "Redis: required configuration").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from config.settings import Settings

log = logging.getLogger(__name__)

#: What the broker must be configured with (docs/operations.md, "Redis: required
#: configuration"): setting -> the values that keep queued and unacknowledged messages.
REQUIRED_BROKER_CONFIG: dict[str, tuple[str, ...]] = {
    "appendonly": ("yes",),
    "appendfsync": ("everysec", "always"),
    "maxmemory-policy": ("noeviction",),
}


def broker_durability_problems(config: Mapping[str, str]) -> list[str]:
    """One sentence per Redis setting (from ``CONFIG GET``) that can lose messages."""
    problems = []
    for name, allowed in REQUIRED_BROKER_CONFIG.items():
        value = config.get(name)
        if value is not None and value not in allowed:
            problems.append(
                f"Redis broker has {name} {value}, not {' or '.join(allowed)}: "
                + (
                    "a restart loses queued and unacknowledged messages"
                    if name != "maxmemory-policy"
                    else "when memory is full Redis may evict queued messages"
                )
            )
    return problems


def warn_about_broker(settings: Settings) -> list[str]:
    """Check a Redis broker's persistence and eviction settings; log a WARNING for each problem.

    Never fails the worker: a broker that forbids ``CONFIG`` (managed Redis services often do)
    is reported at INFO, with the settings to check by hand.
    """
    url = settings.effective_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return []
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    try:
        config: dict[str, str] = {}
        for name in REQUIRED_BROKER_CONFIG:
            config.update({str(k): str(v) for k, v in client.config_get(name).items()})
    except redis.RedisError as exc:
        log.info(
            "could not read the Redis broker's configuration (%s): make sure it runs with "
            "appendonly yes, appendfsync everysec and maxmemory-policy noeviction",
            exc,
        )
        return []
    finally:
        client.close()
    problems = broker_durability_problems(config)
    for problem in problems:
        log.warning("%s (docs/operations.md)", problem)
    return problems
