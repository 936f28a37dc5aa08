"""The telephony HTTP gateway over real HTTP on loopback, publishing to the live worker."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from models.events import CrmEvent
from tasks.telephony.adapters import read_cdr_csv
from tasks.views import events_json
from tests.conftest import EXAMPLES, load_example
from tests.http_service import HttpService, start_service, stop_service
from tests.integration.conftest import LiveSystem
from workers.gateways.http.webhooks import twilio_signature
from workers.publish import wait_for

pytestmark = pytest.mark.integration

TOKEN = "twilio-test-token-0123456789abcdef"
SECRET = "webhook-test-secret-s3cr3t"
PUBLIC = "https://crm.example.fi/telephony"


class Gateway(HttpService):
    """The service, with the webhooks' ways of posting."""

    def post_json(self, path: str, document: Any, secret: str | None = SECRET) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-CRM-Webhook-Secret"] = secret
        return self.request("POST", path, json.dumps(document).encode(), headers)

    def post_twilio(
        self, fields: dict[str, str], signed_url: str | None = None, signature: str | None = None
    ) -> tuple[int, Any]:
        body = urlencode(fields).encode()
        if signature is None:
            url = signed_url or PUBLIC + "/twilio/status"
            signature = twilio_signature(TOKEN, url, list(fields.items()))
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        }
        return self.request("POST", "/twilio/status", body, headers)


def start_gateway(env: dict[str, str], log: Path) -> Gateway:
    started = start_service(env, log)
    return Gateway(started.process, started.port, started.log)


def stop_gateway(gateway: Gateway) -> None:
    stop_service(gateway)


@pytest.fixture(scope="module")
def loaded(live: LiveSystem) -> LiveSystem:
    assert {d.outcome for d in live.publish("party", load_example("parties.json"))} == {"done"}
    return live


@pytest.fixture(scope="module")
def gateway(loaded: LiveSystem) -> Iterator[Gateway]:
    env = {
        **loaded.env,
        "CRM_TWILIO_AUTH_TOKEN": TOKEN,
        "CRM_WEBHOOK_SECRET": SECRET,
        "CRM_PUBLIC_BASE_URL": PUBLIC,
        "CRM_HTTP_MAX_BODY_BYTES": "65536",
    }
    gateway = start_gateway(env, loaded.settings.data_dir / "http-gateway.log")
    yield gateway
    stop_gateway(gateway)


def outcomes(live: LiveSystem, task_ids: list[str]) -> list[str]:
    done = wait_for(live.sessions, task_ids, 60)
    assert set(done) == set(task_ids), f"not processed; worker log:\n{live.tail()}"
    return [done[t].outcome for t in task_ids]


def event(live: LiveSystem, source_id: str, source: str | None = None) -> dict[str, Any]:
    query = select(CrmEvent).where(CrmEvent.source_id == source_id)
    if source:
        query = query.where(CrmEvent.source_system == source)
    with live.sessions() as session:
        events = session.scalars(query).all()
        assert len(events) == 1, f"{len(events)} events for {source_id}"
        return events_json(session, list(events), live.settings.zone)[0]


def count_events(live: LiveSystem, source_id: str) -> int:
    with live.sessions() as session:
        return len(session.scalars(select(CrmEvent).where(CrmEvent.source_id == source_id)).all())


def test_health(gateway: Gateway) -> None:
    assert gateway.request("GET", "/healthz") == (
        200,
        {"status": "ok", "database": "ok", "broker": "ok"},
    )


def test_twilio_status_callbacks_out_of_order_become_one_event(
    gateway: Gateway, loaded: LiveSystem
) -> None:
    task_ids = []
    for callback in load_example("calls/twilio-status-callbacks.json"):
        status, reply = gateway.post_twilio(callback)
        assert status == 200, reply
        task_ids += reply["task_ids"]
    assert outcomes(loaded, task_ids) == ["stored"] * 3
    stored = event(loaded, "CA1f0d2c3b4a5968778695a4b3c2d1e0f9")
    assert (stored["status"], stored["duration_s"], stored["contact"]) == (
        "completed",
        398,
        "Liisa Korhonen",
    )
    # Twilio sends a callback again when it saw no answer: a duplicate, not a second event.
    status, reply = gateway.post_twilio(load_example("calls/twilio-status-callbacks.json")[0])
    assert status == 200
    assert outcomes(loaded, reply["task_ids"]) == ["duplicate"]
    # A duration that str.isdigit() takes but int() cannot read is left out, as any unreadable
    # one: the callback is stored, not answered with 500.
    odd = {**load_example("calls/twilio-status-callbacks.json")[0], "CallDuration": "\u00b2"}
    odd |= {"CallSid": "CA" + "5" * 32, "CallStatus": "completed"}
    status, reply = gateway.post_twilio(odd)
    assert status == 200, reply
    assert outcomes(loaded, reply["task_ids"]) == ["stored"]


def test_twilio_signatures_are_checked(gateway: Gateway, loaded: LiveSystem) -> None:
    fields = {
        "CallSid": "CAforged0000000000000000000000000",
        "CallStatus": "completed",
        "Direction": "inbound",
        "From": "+358401234567",
        "To": "+35891110000",
    }
    # Signed over the URL the gateway is reached at, not the public one Twilio calls.
    loopback = f"http://127.0.0.1:{gateway.port}/twilio/status"
    assert gateway.post_twilio(fields, signed_url=loopback)[0] == 403
    assert gateway.post_twilio(fields, signature="")[0] == 403
    assert gateway.post_twilio(fields, signature="bm90IGEgc2lnbmF0dXJl")[0] == 403
    tampered = twilio_signature(TOKEN, PUBLIC + "/twilio/status", list(fields.items()))
    assert gateway.post_twilio({**fields, "CallStatus": "busy"}, signature=tampered)[0] == 403
    # A signature with the default port written out is Twilio's too.
    status, reply = gateway.post_twilio(
        {**fields, "CallSid": "CAport000000000000000000000000000"},
        signed_url="https://crm.example.fi:443/telephony/twilio/status",
    )
    assert status == 200
    outcomes(loaded, reply["task_ids"])
    assert count_events(loaded, "CAforged0000000000000000000000000") == 0


def test_call_json_needs_the_shared_secret(gateway: Gateway, loaded: LiveSystem) -> None:
    message = load_example("calls/outbound-sales-action.json")[0]
    assert gateway.post_json("/calls", message, secret=None)[0] == 401
    assert gateway.post_json("/calls", message, secret="wrong")[0] == 401
    assert gateway.post_json("/calls", message, secret=SECRET[:-1])[0] == 401
    # The sample call under ids of its own (the live system is shared by the tests).
    updates = [
        {**m, "source_system": "pbx-gateway", "call_id": "gw-" + m["call_id"]}
        for m in load_example("calls/inbound-answered.json")
    ]
    status, reply = gateway.post_json("/calls", updates)
    assert (status, reply["enqueued"]) == (200, 3)
    assert outcomes(loaded, reply["task_ids"]) == ["stored"] * 3
    with loaded.sessions() as session:
        stored = session.scalar(
            select(CrmEvent).where(
                CrmEvent.source_system == "pbx-gateway",
                CrmEvent.source_id == "gw-c-2026-11-23-0001",
            )
        )
        assert stored is not None and (stored.status, stored.duration_s) == ("completed", 448)


def test_bad_requests_are_answered_and_nothing_is_queued(gateway: Gateway) -> None:
    status, reply = gateway.post_json("/calls", {"schema": "crm.call/1", "source_system": "x"})
    assert status == 400 and "call_id: Missing data" in reply["error"]
    assert (
        gateway.request(
            "POST",
            "/calls",
            b"{not json",
            {"Content-Type": "application/json", "X-CRM-Webhook-Secret": SECRET},
        )[0]
        == 400
    )
    assert (
        gateway.request(
            "POST", "/calls", b"{}", {"Content-Type": "text/plain", "X-CRM-Webhook-Secret": SECRET}
        )[0]
        == 415
    )
    big = json.dumps({"note": "x" * 70_000}).encode()
    headers = {"Content-Type": "application/json", "X-CRM-Webhook-Secret": SECRET}
    assert gateway.request("POST", "/calls", big, headers)[0] == 413
    assert gateway.request("GET", "/nowhere")[0] == 404
    assert gateway.request("GET", "/calls")[0] == 405
    assert (
        gateway.request(
            "POST",
            "/twilio/status",
            b"\xff\xfe",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )[0]
        == 400
    )
    # Garbage on the socket does not take the gateway down.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        raw.sendall(b"\x00\x01 NOT HTTP \r\n\r\n" * 10)
        raw.recv(1024)
    assert gateway.request("GET", "/healthz")[0] == 200


def test_asterisk_cdrs_as_json(gateway: Gateway, loaded: LiveSystem) -> None:
    rows = [r.fields for r in read_cdr_csv((EXAMPLES / "calls/asterisk-cdr.csv").read_text())]
    assert gateway.post_json("/asterisk/cdr", rows, secret=None)[0] == 401
    status, reply = gateway.post_json("/asterisk/cdr?source_system=pbx-gw", rows)
    assert (status, reply["enqueued"]) == (200, 2)
    assert outcomes(loaded, reply["task_ids"]) == ["stored", "stored"]
    answered = event(loaded, "1764144300.161", "pbx-gw")
    assert (answered["source"], answered["seller"], answered["contact"]) == (
        "pbx-gw",
        "mikko",
        "Matti Virtanen",
    )
    assert event(loaded, "1764148800.170", "pbx-gw")["link_state"] == "unlinked"
    status, reply = gateway.post_json("/asterisk/cdr", [{"src": "1", "start": "yesterday"}])
    assert status == 400
    many = "&".join(f"a{i}=1" for i in range(25))
    status, reply = gateway.post_json(f"/asterisk/cdr?{many}", rows)
    assert status == 400 and reply["error"].startswith("unreadable query")
    # A time of the right shape but of no calendar is refused with its reason, not a 500.
    assert rows[0] is not None
    bad_day = {**rows[0], "start": "2026-02-30 10:00:00"}
    status, reply = gateway.post_json("/asterisk/cdr", [rows[1], bad_day])
    assert (status, reply["index"]) == (400, 1), reply
    assert "CDR start '2026-02-30 10:00:00' is not a time" in reply["error"]
    # A folder of the zone database is no zone (zoneinfo raised OSError for it: a 500).
    for zone in ("Europe", "A" * 300):
        status, reply = gateway.post_json(f"/asterisk/cdr?time_zone={zone}", rows)
        assert (status, reply) == (400, {"error": f"unknown time_zone {zone[:64]!r}"})


def test_no_2xx_without_the_broker(loaded: LiveSystem, tmp_path: Path) -> None:
    env = {**loaded.env, "CRM_BROKER_URL": "redis://127.0.0.1:1/0", "CRM_WEBHOOK_SECRET": SECRET}
    dead = start_gateway(env, tmp_path / "dead-gateway.log")
    try:
        status, reply = dead.post_json("/calls", load_example("calls/outbound-sales-action.json"))
        assert status == 503, reply
        assert dead.request("GET", "/healthz")[0] == 503
    finally:
        stop_gateway(dead)


def test_secrets_never_reach_the_log(gateway: Gateway) -> None:
    text = gateway.log.read_text()
    assert '"POST /calls" 401' in text  # requests are logged …
    assert TOKEN not in text and SECRET not in text  # … their secrets are not
