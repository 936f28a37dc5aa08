"""`crm-events flower`: behind basic auth, or on loopback with an explicit --no-auth; never open.

A real Flower process on loopback, on the session's broker.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import LiveSystem
from tests.processes import free_port, stop_process

pytestmark = pytest.mark.integration

USER, PASSWORD = "admin", "flower-Test-9d8c7b6a"


def get(port: int, path: str, credentials: str | None = None) -> tuple[int, bytes]:
    headers = {}
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Flower:
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "flower", f"--port={self.port}", *args],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, f"flower exited:\n{log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"flower not listening:\n{log.read_text()}"
                time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.process, timeout=20)


@pytest.fixture(scope="module")
def flower(live: LiveSystem) -> Iterator[Flower]:
    env = {
        **live.env,
        "CRM_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "CRM_LOG_LEVEL": "DEBUG",
    }
    server = Flower(env, live.settings.data_dir / "flower.log")
    yield server
    server.stop()


def test_without_credentials_flower_answers_401(flower: Flower) -> None:
    assert get(flower.port, "/")[0] == 401
    assert get(flower.port, "/api/workers")[0] == 401
    assert get(flower.port, "/", f"{USER}:wrong")[0] == 401


def test_with_credentials_flower_answers_200(flower: Flower) -> None:
    status, body = get(flower.port, "/", f"{USER}:{PASSWORD}")
    assert status == 200 and b"Flower" in body


def test_flower_reads_the_queue_lengths_and_its_broker_page(flower: Flower) -> None:
    """Flower knows kombu's own transports only: it answered 404 "'redis' broker is not
    supported" while it ran on the worker's subclass of the Redis transport."""
    status, body = get(flower.port, "/api/queues/length", f"{USER}:{PASSWORD}")
    assert status == 200, body
    queues = {queue["name"]: queue["messages"] for queue in json.loads(body)["active_queues"]}
    assert "crm.ingest.call" in queues and all(isinstance(n, int) for n in queues.values())
    status, body = get(flower.port, "/broker", f"{USER}:{PASSWORD}")
    assert status == 200 and b"crm.ingest.email" in body


def test_flower_switches_the_task_events_on(live: LiveSystem, flower: Flower) -> None:
    """Workers send no task events until a monitor asks (CRM_TASK_EVENTS=on-demand): Flower
    asks as it runs, and the messages processed from then on are in its task list."""
    from tests.messages import outbound_call

    deadline = time.monotonic() + 90
    while True:
        [delivery] = live.publish(
            "call", [outbound_call(f"flower-{uuid.uuid4()}", "2001-03-05T10:00:00+02:00")]
        )
        status, body = get(flower.port, "/api/tasks?limit=1000", f"{USER}:{PASSWORD}")
        assert status == 200, body
        if delivery.task_id in json.loads(body):
            break
        assert time.monotonic() < deadline, f"not in Flower's task list: {delivery.task_id}"


@pytest.mark.parametrize("protocol", [2, 1])
def test_flower_lists_a_message_by_kind_source_and_id_whoever_sent_it(
    live: LiveSystem, flower: Flower, protocol: int
) -> None:
    """A producer that is not ours puts the whole message in its ``argsrepr`` header (Celery's
    protocol 2 does), or the worker makes one from the body (protocol 1): Flower shows the
    worker's summary all the same, never the number, the note or the agent."""
    from celery import Celery

    from tests.messages import outbound_call
    from workers.publish import wait_for

    sender = Celery("foreign", broker=live.settings.broker_url, set_as_current=False)
    sender.conf.update(task_protocol=protocol, task_serializer="json")
    deadline = time.monotonic() + 90
    try:
        while True:
            call_id = f"flower-{uuid.uuid4()}"
            message = outbound_call(
                call_id, "2001-03-05T10:00:00+02:00", note="Liisa soitti huoltosopimuksesta"
            )
            task_id = str(uuid.uuid4())
            sender.send_task(
                "crm.ingest.call", args=[message], task_id=task_id, queue="crm.ingest.call"
            )
            assert task_id in wait_for(live.sessions, [task_id], 60), live.tail()
            status, body = get(flower.port, "/api/tasks?limit=1000", f"{USER}:{PASSWORD}")
            assert status == 200, body
            task = json.loads(body).get(task_id)
            if task is not None and task.get("args"):
                break
            assert time.monotonic() < deadline, f"not in Flower's task list: {task_id}"
    finally:
        sender.close()
    assert task["args"] == f"(crm.call/1 from pbx-hki: call_id {call_id})", task
    assert task["kwargs"] == "{}", task
    shown = json.dumps(task)
    for personal in ("765 4321", "huoltosopimuksesta", "anna"):
        assert personal not in shown, personal


def test_metrics_and_healthcheck_need_no_credentials(flower: Flower) -> None:
    """What docs/security.md says: /metrics (Prometheus) and /healthcheck are open in
    Flower 2.2, whatever the basic auth; /metrics names workers and task names and counts,
    never arguments. A change here needs the docs to change with it."""
    status, body = get(flower.port, "/metrics")
    assert status == 200 and b"flower_" in body
    assert PASSWORD.encode() not in body
    assert get(flower.port, "/healthcheck") == (200, b"OK")


def test_the_password_is_not_logged(flower: Flower) -> None:
    get(flower.port, "/", f"{USER}:{PASSWORD}")
    text = flower.log.read_text(errors="replace")
    assert "DEBUG" in text
    assert PASSWORD not in text


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_flower_refuses_to_start_without_credentials(live: LiveSystem) -> None:
    result = run_cli(live.env, f"--port={free_port()}")
    assert result.returncode == 2
    assert "CRM_FLOWER_BASIC_AUTH" in result.stderr and "--no-auth" in result.stderr


def test_no_auth_is_loopback_only(live: LiveSystem) -> None:
    result = run_cli(live.env, "--no-auth", "--address=0.0.0.0", f"--port={free_port()}")
    assert result.returncode == 2 and "loopback only" in result.stderr
    result = run_cli(live.env, "--basic-auth=a:b", f"--port={free_port()}")
    assert result.returncode == 2 and "CRM_FLOWER_BASIC_AUTH" in result.stderr

    server = Flower(live.env, live.settings.data_dir / "flower-no-auth.log", "--no-auth")
    try:
        assert get(server.port, "/")[0] == 200
        # Bound to loopback: another address of this host is not served.
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, server.port), timeout=2).close()
    finally:
        server.stop()
