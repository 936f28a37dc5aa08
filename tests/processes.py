"""Processes the tests start: their environment and ports, a worker's readiness, a warm stop
of anything we run, and waiting for what they report (a condition, a line in their log)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a process we start (worker, gateway, CLI): the inherited one without
    any CRM_* variable, plus the settings' database, broker, Redis and data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATABASE_URL=settings.database_url,
        CRM_BROKER_URL=settings.broker_url,
        CRM_REDIS_URL=settings.redis_url,
        CRM_DATA_DIR=str(settings.data_dir),
        CRM_LOG_LEVEL="INFO",
    )
    return env | extra


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``crm-events ARGS`` as a user runs it, in this environment."""
    from tests.conftest import ROOT

    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def cli_json(env: dict[str, str], *args: str) -> Any:
    """``crm-events ARGS --json``, which must succeed: the JSON it printed."""
    done = run_cli(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the main process (a worker's warm shutdown), then SIGKILL to its process
    group (started with ``start_new_session=True``) if it is still there after ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_worker(
    app: Any,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    node: str | None = None,
    timeout: float = 60,
) -> None:
    """Until the worker (``node``, or any) answers a ping; fails with its log if it exits."""
    destination = [node] if node else None
    deadline = time.monotonic() + timeout
    while not app.control.ping(destination=destination, timeout=1):
        assert process.poll() is None, f"worker exited:\n{log()}"
        assert time.monotonic() < deadline, f"worker did not answer a ping:\n{log()}"


#: How often ``wait_until`` asks again. A process's log or a broker's queue has no way to tell
#: the test that it changed, so the condition is asked again at this pace until its deadline.
POLL_S = 0.05


def wait_until(
    condition: Callable[[], Any], what: str | Callable[[], str], timeout: float = 60
) -> Any:
    """``condition()`` once it is true (its value), asked every ``POLL_S`` until ``timeout``
    seconds have passed; then the test fails with ``what`` (or what it returns then)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what if isinstance(what, str) else what()
        time.sleep(POLL_S)
    return value


def wait_for_log(path: Path, text: str, timeout: float = 60) -> str:
    """The log at ``path`` once it holds ``text`` (its whole text, for further asserts)."""

    def read() -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def holding() -> str:
        log = read()
        return log if text in log else ""

    found: str = wait_until(
        holding, lambda: f"{text!r} not logged in {path}:\n{read()[-4000:]}", timeout
    )
    return found
