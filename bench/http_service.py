"""The HTTP service under load: requests per second and latency at a million stored events.

Builds the world of bench/refresh.py (a scratch PostgreSQL database, N events over a year for S
sellers, tallies and targets), starts ``crm-events serve`` on it (Redis as the broker, no
worker: posted messages wait in their queue), and drives three endpoints of the same process,
one after another, from C client threads with kept-alive connections:

- ``GET /livez``: a trivial endpoint of the same app (no database, no broker), the baseline;
- ``GET /v1/sellers/{username}/view``: a random seller's cards (a month of events, targets);
- ``POST /v1/calls``: one call update, validated and queued.

It prints, for each, requests per second and p50/p95/p99 latency, and the ratios to the trivial
endpoint; the load average before and after, as the machine is shared. Not a test: run it by
hand (5-8 minutes on a 2-core machine at the defaults):

    .venv/bin/python bench/http_service.py --events 1000000 --sellers 200
"""

from __future__ import annotations

# ruff: noqa: E402  (the path is fixed before the other imports)
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)
sys.path.append(str(ROOT / "bench"))  # the other scripts, by name, last

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import threading
import time
import uuid
from typing import Any

import redis
from refresh import load, percentile, scratch_database

from models.db import transaction
from tasks.access import create_token


def start_service(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "serve", "--port", "0"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while True:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return process, int(found[1])
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start:\n{log.read_text()}")
        time.sleep(0.1)


def drive(
    port: int,
    clients: int,
    requests: int,
    build: Any,
) -> tuple[float, list[float], dict[int, int]]:
    """Send ``requests`` requests from ``clients`` threads; (seconds, latencies, statuses)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    per_client = requests // clients

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        seen: dict[int, int] = {}
        for _ in range(per_client):
            method, path, body, headers = build(rng)
            started = time.perf_counter()
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            seen[response.status] = seen.get(response.status, 0) + 1
        connection.close()
        with lock:
            latencies.extend(mine)
            for status, count in seen.items():
                statuses[status] = statuses.get(status, 0) + count

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sellers", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--requests", type=int, default=2000, help="requests per endpoint")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    print(f"load average before: {os.getloadavg()}", flush=True)
    with scratch_database(args.keep) as url:
        loaded = load(url, args.sellers, args.events, figures)
        with transaction(loaded["sessions"]) as session:
            _, reader = create_token(session, f"bench-read-{uuid.uuid4().hex[:6]}", "read")
            _, producer = create_token(session, f"bench-ingest-{uuid.uuid4().hex[:6]}", "ingest")
        broker = redis.Redis.from_url(args.redis_url)
        broker.flushdb()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
        env.update(
            CRM_DATABASE_URL=url,
            CRM_BROKER_URL=args.redis_url,
            CRM_DATA_DIR=str(loaded["settings"].data_dir),
            CRM_LOG_LEVEL="INFO",
        )
        process, port = start_service(env, loaded["settings"].data_dir / "serve.log")
        sellers = [person.username for person in loaded["people"]]
        numbers = iter(range(10**9))

        def trivial(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
            return "GET", "/livez", b"", {}

        def view(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
            return (
                "GET",
                f"/v1/sellers/{rng.choice(sellers)}/view",
                b"",
                {"Authorization": f"Bearer {reader}"},
            )

        def post_call(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
            call = {
                "schema": "crm.call/1",
                "source_system": "bench-http",
                "call_id": f"bh-{next(numbers)}",
                "status": "completed",
                "direction": "outbound",
                "from": str(5000 + rng.randint(1, len(sellers))),
                "to": "+358 40 123 4567",
                "started_at": "2026-12-01T10:00:00+02:00",
                "duration_s": 120,
            }
            headers = {"Authorization": f"Bearer {producer}", "Content-Type": "application/json"}
            return "POST", "/v1/calls", json.dumps(call).encode(), headers

        results: dict[str, dict[str, float]] = {}
        try:
            for label, build in (
                ("GET /livez (trivial)", trivial),
                ("GET /v1/sellers/{u}/view", view),
                ("POST /v1/calls", post_call),
            ):
                drive(port, args.clients, args.warmup, build)
                seconds, latencies, statuses = drive(port, args.clients, args.requests, build)
                rate = len(latencies) / seconds
                results[label] = {
                    "requests_per_s": rate,
                    "p50_ms": percentile(latencies, 0.50) * 1000,
                    "p95_ms": percentile(latencies, 0.95) * 1000,
                    "p99_ms": percentile(latencies, 0.99) * 1000,
                }
                print(
                    f"{label}: {rate:.0f} req/s, p50 {results[label]['p50_ms']:.1f} ms,"
                    f" p95 {results[label]['p95_ms']:.1f} ms, p99 {results[label]['p99_ms']:.1f}"
                    f" ms, statuses {statuses}",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(30)
            broker.flushdb()
            loaded["engine"].dispose()
    baseline = results["GET /livez (trivial)"]
    print("\nagainst the trivial endpoint of the same app, same run:")
    for label, result in results.items():
        print(
            f"  {label}: {result['requests_per_s'] / baseline['requests_per_s']:.2f} × its"
            f" rate, p95 {result['p95_ms'] / baseline['p95_ms']:.1f} × its p95"
        )
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps({"figures": figures, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
