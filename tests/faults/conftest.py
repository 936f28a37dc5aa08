"""A private PostgreSQL cluster and redis-server for the fault tests, shared by the module.

They are ours to restart and kill; the machine's shared services are never touched. Missing
server binaries fail the run (tests/ensure_services.sh installs them), never skip it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import (
    PrivatePostgres,
    PrivateRedis,
    ServiceMissing,
    postgres_bin,
    redis_server_bin,
)


@dataclass
class Services:
    pg: PrivatePostgres
    redis: PrivateRedis
    work_dir: Path


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    try:
        postgres_bin()
        redis_server_bin()
    except ServiceMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    pg = PrivatePostgres()
    broker = PrivateRedis()
    pg.start()
    try:
        broker.start()
        try:
            yield Services(pg, broker, tmp_path_factory.mktemp("faults"))
        finally:
            broker.stop()
    finally:
        pg.stop()
