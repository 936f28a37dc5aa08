"""Chaos run: a long mixed stream through real workers while every fault of the fault tests hits.

The machinery is the fault tests' own (``tests/faults/harness.py``): a private PostgreSQL
cluster (``initdb`` in a temporary folder, a free loopback port) and a private ``redis-server``
with AOF, so the machine's shared services are never restarted; ``--workers`` real
``crm-events worker`` processes; a deterministic stream of calls with 2-4 updates (shuffled, so
out of order), emails with a PDF attachment, visits with a later update and about one bad
message in fifty. Every ``--thrice``-th message is published three times: once more under the
same task id (a broker redelivery) and once under a new one (a sender retrying).

The stream goes out in ``--chunk`` sized parts (default: sixteen parts, so every fault of the
rotation comes twice); between two parts, while the workers are busy, the next fault of a fixed
rotation: SIGKILL of pool processes, SIGKILL of a main worker process (a new one starts), a
graceful Redis restart (SHUTDOWN fsyncs the AOF), PostgreSQL ``restart -m fast`` and
``-m immediate``. A worker main process that exits by itself is started again, as the
deployment's ``restart: unless-stopped`` would, and counted. Then it waits for every task id's
outcome and prints the accounting: published, events expected/found, missing, duplicates,
rejected, failed, tally drift against a recomputation from scratch, whether the workers still
consume, time and rate.

    .venv/bin/python bench/chaos.py --messages 2000
    .venv/bin/python bench/chaos.py                 # 20,000 messages

Exit status 0 when the accounting is exact, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from tests.faults.harness import (  # noqa: E402
    REDELIVERY_S,
    PrivatePostgres,
    PrivateRedis,
    Scenario,
    account,
    build_stream,
    scenario,
)

FAULTS = (
    "child",
    "child",
    "redis",
    "child",
    "postgres-fast",
    "main",
    "child",
    "postgres-immediate",
)


def inject(fault: str, run: Scenario, pg: PrivatePostgres, broker: PrivateRedis,
           rng: random.Random, faults: Counter[str]) -> None:  # fmt: skip
    if fault == "child":
        for _ in range(2):
            if run.workers.kill_child(rng):
                faults["SIGKILL pool process"] += 1
            time.sleep(rng.uniform(0.1, 0.8))
    elif fault == "main":
        run.workers.kill_main(rng)
        faults["SIGKILL main process"] += 1
    elif fault == "redis":
        broker.restart()
        faults["Redis restart"] += 1
    else:
        pg.restart(fault.split("-")[1])
        faults[f"PostgreSQL restart -m {fault.split('-')[1]}"] += 1


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="distinct messages")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker")
    parser.add_argument(
        "--chunk", type=int, default=0, help="messages between two faults (default: 1/16 of all)"
    )
    parser.add_argument("--thrice", type=int, default=10, help="every Nth message sent 3 times")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the worker logs")
    args = parser.parse_args()

    # SIGTERM (kill, a CI timeout) ends the run like Ctrl-C does: through the clean-up below,
    # which stops the workers, the private PostgreSQL and Redis, and removes their files.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.chunk = args.chunk or max(20, args.messages // 16)
    rng = random.Random(args.seed)
    stream = build_stream(args.messages, seed=args.seed)
    work_dir = Path(tempfile.mkdtemp(prefix="crm-chaos-"))
    pg = PrivatePostgres().start()
    broker = PrivateRedis().start()
    faults: Counter[str] = Counter()
    status = 1
    try:
        with scenario(
            pg, broker, work_dir, "chaos", workers=args.workers, concurrency=args.concurrency
        ) as run:
            print(
                f"{len(stream.messages)} messages ({stream.bad} bad, {len(stream.expected)}"
                f" events expected), {args.workers} workers x {args.concurrency}",
                flush=True,
            )
            chunks = [
                stream.messages[i : i + args.chunk]
                for i in range(0, len(stream.messages), args.chunk)
            ]
            for number, chunk in enumerate(chunks):
                once = [m for i, m in enumerate(chunk) if (i + 1) % args.thrice]
                thrice = [m for i, m in enumerate(chunk) if not (i + 1) % args.thrice]
                run.publish(once)
                run.publish(thrice, copies=3, same_id_copies=1, rng=rng)
                fault = FAULTS[number % len(FAULTS)]
                time.sleep(rng.uniform(0.5, 3))  # let the workers get into the chunk
                inject(fault, run, pg, broker, rng, faults)
                if run.workers.revive():
                    print("  a worker main process had exited by itself: started again")
                print(
                    f"  chunk {number + 1}/{len(chunks)} published, fault: {fault};"
                    f" {len(run.outcomes())}/{len(run.sent.task_ids)} outcomes so far",
                    flush=True,
                )
            # A generous bound: the rate observed so far, plus a redelivery after the last kill.
            result = account(
                run, stream, timeout=max(600, 2 * len(stream.messages)), supervise=True
            )
            result.faults = faults + Counter(
                {"worker exited by itself": run.workers.kills["exited by itself"]}
            )
            print("\n".join(result.lines()))
            for problem in result.problems():
                print(f"PROBLEM: {problem}")
            print(f"(a killed main process's messages return after about {REDELIVERY_S} s)")
            status = 0 if result.ok else 1
    finally:
        broker.stop()
        pg.stop()
        if args.keep or status:
            print(f"worker logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
