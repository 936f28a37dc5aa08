"""The screens in a real browser: Debian's Chromium driven by Playwright, against the embedded
demo (its world dated around today), a worker and ``crm-events serve`` on loopback.

Screenshots of every screen go to ``var/test-artifacts/screens/`` (look at them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.conftest import ROOT
from tests.processes import cli_json, run_cli, stop_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "var" / "test-artifacts" / "screens"
#: Chromium on a closed network, as root, with no screen (what this machine allows).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Screens:
    data_dir: Path
    env: dict[str, str]
    port: int
    tokens: dict[str, str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args)

    def cli_json(self, *args: str) -> Any:
        return cli_json(self.env, *args)


def start(env: dict[str, str], args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )


@pytest.fixture(scope="session")
def screens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Screens]:
    data_dir = tmp_path_factory.mktemp("screens")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env["CRM_DATA_DIR"] = str(data_dir)
    world = Screens(data_dir, env, 0, {})
    done = world.cli("demo", "--no-serve")
    assert done.returncode == 0, done.stdout + done.stderr
    for name, scope, staff in (
        ("anna-screen", "admin", "anna"),
        ("helena-board", "read", "helena"),
        ("field-app", "ingest", None),
    ):
        args = ["token", "create", name, "--scope", scope] + (["--staff", staff] if staff else [])
        world.tokens[name] = world.cli_json(*args)["token"]
    worker = start(env, ["worker", "--concurrency", "2"], data_dir / "worker.log")
    service = start(env, ["serve", "--port", "0"], data_dir / "serve.log")
    deadline = time.monotonic() + 60
    log = data_dir / "serve.log"
    while True:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            world.port = int(found[1])
            break
        assert service.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield world
    finally:
        stop_process(service)
        stop_process(worker)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: tests/ensure_services.sh installs it"
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield launched
    launched.close()
