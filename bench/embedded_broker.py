"""Measure the candidate embedded brokers: kombu's filesystem transport (with our atomic
writes, ``workers.transport.broker_fs``) against kombu's SQLAlchemy transport on a SQLite file.

For each, a real worker process (prefork, concurrency 2, the product's delivery settings)
consumes N no-op tasks; the figure is tasks/s from the first publish to the last completion,
the median of R runs. Not a test: run it by hand.

    .venv/bin/python bench/embedded_broker.py --tasks 500 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery

WORKER_CODE = """
import sys
from pathlib import Path
from celery import Celery
transport, url, done_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
app = Celery("bench", broker=url)
app.conf.update(
    broker_transport=transport or None,
    broker_transport_options=eval(sys.argv[4]),
    task_serializer="json", accept_content=["json"], task_ignore_result=True,
    task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
)

@app.task(name="bench.noop")
def noop(n):
    (done_dir / str(n)).touch()

app.worker_main(["worker", "-c", "2", "-Q", "bench", "--loglevel", "WARNING",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"])
"""


def candidates(root: Path) -> dict[str, tuple[str, str, dict[str, object]]]:
    folder = root / "fs"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    fs_options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.05,
    }
    return {
        "filesystem (workers.transport.broker_fs)": (
            "workers.transport.broker_fs:Transport",
            "filesystem://localhost/",
            fs_options,
        ),
        "sqlalchemy on SQLite": ("", f"sqla+sqlite:///{root / 'broker.sqlite3'}", {}),
    }


def measure(name: str, spec: tuple[str, str, dict[str, object]], tasks: int, root: Path) -> float:
    transport, url, options = spec
    done = Path(tempfile.mkdtemp(dir=root))
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_CODE, transport, url, str(done), repr(options)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    app = Celery("bench-client", broker=url)
    app.conf.update(
        broker_transport=transport or None, broker_transport_options=options, task_serializer="json"
    )
    try:
        time.sleep(3)  # let the worker start consuming
        started = time.monotonic()
        for n in range(tasks):
            app.send_task("bench.noop", args=[n], queue="bench")
        while len(os.listdir(done)) < tasks:
            if time.monotonic() - started > 300:
                raise SystemExit(
                    f"{name}: only {len(os.listdir(done))} of {tasks} done after 300 s"
                )
            time.sleep(0.02)
        return tasks / (time.monotonic() - started)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        specs = candidates(Path(tmp))
        for run in range(args.repeats):
            for name, spec in specs.items():
                rate = measure(name, spec, args.tasks, Path(tmp))
                results.setdefault(name, []).append(rate)
                print(f"run {run + 1}: {name}: {rate:,.0f} tasks/s", flush=True)
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    for name, median in medians.items():
        print(f"median {name}: {median:,.0f} tasks/s")
    fs, sqla = medians.values()
    print(f"ratio filesystem / sqlalchemy: {fs / sqla:.2f}")


if __name__ == "__main__":
    main()
