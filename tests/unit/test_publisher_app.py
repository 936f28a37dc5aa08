"""The app the publishing commands use: it sends by task name without loading the tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from config.queues import TASK_QUEUES
from config.settings import Settings

PUBLISHER = """
import json, sys
from config.settings import load_settings
from workers.app import create_app
app = create_app(load_settings(), tasks=False)
routes = {name: app.amqp.router.route({}, name)["queue"].name for name in json.loads(sys.argv[1])}
heavy = ("tasks.", "workers.pipeline", "workers.base")
loaded = sorted(m for m in sys.modules if m.startswith(heavy))
print(json.dumps({"routes": routes, "loaded": loaded, "tasks": sorted(app.tasks)}))
"""


def test_a_publishing_app_routes_as_the_workers_without_loading_the_tasks(
    settings: Settings,
) -> None:
    from workers.app import create_app

    names = sorted(TASK_QUEUES)
    done = subprocess.run(
        [sys.executable, "-c", PUBLISHER, json.dumps(names)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    publisher: dict[str, Any] = json.loads(done.stdout)
    assert publisher["loaded"] == []
    assert not [name for name in publisher["tasks"] if name.startswith("crm.")]
    worker = create_app(settings)
    assert publisher["routes"] == {
        name: worker.amqp.router.route({}, name)["queue"].name for name in names
    }
    assert set(publisher["routes"].values()) == set(TASK_QUEUES.values())
