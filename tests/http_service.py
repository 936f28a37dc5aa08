"""The HTTP service as the tests run it: a real ``crm-events serve`` process on loopback."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.processes import stop_process


@dataclass
class HttpService:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def exchange(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and the raw body of one request."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        answered: dict[str, str] = {}
        for name, value in response.getheaders():
            # Several Set-Cookie headers: one per line.
            key = name.lower()
            answered[key] = f"{answered[key]}\n{value}" if key in answered else value
        return response.status, answered, raw

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        status, answer_headers, raw = self.exchange(method, path, body, headers)
        if answer_headers.get("content-type", "").startswith("application/json"):
            return status, json.loads(raw)
        return status, raw.decode("utf-8", "replace")


def start_service(env: dict[str, str], log: Path) -> HttpService:
    """``crm-events serve --port 0``, once it listens."""
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
            return HttpService(process, int(found[1]), log)
        assert process.poll() is None, f"the service exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the service did not start:\n{log.read_text()}"
        time.sleep(0.05)


def stop_service(service: HttpService) -> None:
    stop_process(service.process, timeout=15)
