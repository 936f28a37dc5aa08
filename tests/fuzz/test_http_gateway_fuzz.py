"""The HTTP service under fuzzing, over real HTTP on loopback: random methods, paths (the
webhooks and the /v1 API), headers (tokens right, wrong and missing), framings (Content-Length
lies, chunked bodies, huge headers) and bodies (noise, JSON, near-valid calls, Twilio form posts
with good and bad signatures).

Every request that is complete HTTP gets an answer with a status, never a 500; one that is not
(a body shorter than its Content-Length, an unterminated chunked body, noise) may instead be
closed, once the client gives up on it. The service stays up and still takes a valid call
afterwards. It runs as ``crm-events serve`` on the embedded default of its own folder (SQLite
and the filesystem broker), so what it enqueues stays out of every worker's queues.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from tests.fuzz.emails import raw_emails
from tests.fuzz.profiles import examples
from tests.fuzz.strategies import FUZZ_WORLD, json_values, messages, valid_call
from tests.integration.test_http_gateway import Gateway, start_gateway, stop_gateway
from workers.gateways.http.webhooks import twilio_signature

TOKEN = "twilio-fuzz-token-0123456789abcdef"
SECRET = "webhook-fuzz-secret"
PUBLIC = "https://crm.example.fi/telephony"
MAX_BODY = 65536
#: A complete request is answered within this; an incomplete one is answered or closed.
ANSWER_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def http_gateway(fuzz_root: Path) -> Iterator[Gateway]:
    data_dir = fuzz_root / "http-gateway"
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATA_DIR=str(data_dir),
        CRM_TWILIO_AUTH_TOKEN=TOKEN,
        CRM_WEBHOOK_SECRET=SECRET,
        CRM_PUBLIC_BASE_URL=PUBLIC,
        CRM_HTTP_MAX_BODY_BYTES=str(MAX_BODY),
    )

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("init-db")
    for scope in ("admin", "ingest"):
        made = cli("token", "create", f"fuzz-{scope}", "--scope", scope, "--json")
        BEARER[scope] = json.loads(made)["token"]
    gateway = start_gateway(env, data_dir / "http-gateway.log")
    yield gateway
    stop_gateway(gateway)


# -- requests -----------------------------------------------------------------------------------


class RawRequest:
    """Bytes to send; ``complete`` when they are whole HTTP requests, which must be answered
    (otherwise the client half-closes and accepts a close)."""

    def __init__(self, data: bytes, *, complete: bool, method: str = "GET") -> None:
        self.data, self.complete, self.method = data, complete, method

    def __repr__(self) -> str:  # short: reports of a failing example stay readable
        return f"RawRequest(complete={self.complete}, data={self.data[:2000]!r})"


ENDPOINTS = [
    "/calls",
    "/twilio/status",
    "/asterisk/cdr",
    "/healthz",
    "/v1/calls",
    "/v1/visits",
    "/v1/parties",
    "/v1/targets",
    "/v1/emails",
    "/v1/events",
    "/v1/events/1",
    "/v1/events/1/documents/1",
    "/v1/customers/10001/history",
    "/v1/sellers/anna/view",
    "/v1/targets/progress",
    "/openapi.json",
    "/login",
    "/metrics",
]
#: Tokens of the service under test, made when it starts: scope -> token.
BEARER: dict[str, str] = {}
TWILIO_FIELDS = [
    "CallSid",
    "CallStatus",
    "Direction",
    "From",
    "To",
    "Timestamp",
    "SequenceNumber",
    "CallDuration",
    "RecordingUrl",
    "AccountSid",
    "Caller",
    "Called",
]

methods = st.sampled_from(["GET", "POST", "POST", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"]) | (
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!#", min_size=1, max_size=12)
)
paths = st.builds(
    lambda base, suffix, query: base + quote(suffix, safe="/%") + query,
    st.sampled_from([*ENDPOINTS, *ENDPOINTS, "/", "//calls", "/calls/", "*", "/x/../calls"]),
    st.sampled_from(["", "", "", "/extra", "%00", "%ff", "/" + "a" * 9000]) | st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "",
            "?source_system=fuzz",
            "?time_zone=Europe/Helsinki",
            "?time_zone=Bogus/Zone",
            "?time_zone=../../../etc/passwd",
            "?time_zone=%00",
            "?source_system=" + "s" * 300,
            "?" + "&".join(["a=b"] * 100),
        ]
    ),
)


@st.composite
def twilio_form(draw: Any) -> tuple[bytes, list[tuple[str, str]], str]:
    """A Twilio status callback: its fields, and a signature that is right, wrong or missing."""
    fields = draw(
        st.lists(
            st.tuples(
                st.sampled_from(TWILIO_FIELDS) | st.text(max_size=10),
                st.sampled_from(["completed", "ringing", "+358401234567", "inbound", ""])
                | st.text(max_size=20),
            ),
            max_size=12,
        )
    )
    if draw(st.booleans()):
        fields.append(("CallSid", "CAfuzz" + draw(st.text("0123456789abcdef", max_size=30))))
    signature = draw(st.sampled_from(["valid", "other-url", "tampered", "empty", "noise"]))
    url = PUBLIC + "/twilio/status"
    if signature == "valid":
        header = twilio_signature(TOKEN, url, fields)
    elif signature == "other-url":
        header = twilio_signature(TOKEN, "http://127.0.0.1/twilio/status", fields)
    elif signature == "tampered":
        header = twilio_signature(TOKEN, url, [*fields, ("CallStatus", "busy")])
    elif signature == "empty":
        header = ""
    else:
        header = draw(st.text(max_size=40))
    return urlencode(fields).encode(), fields, header


@st.composite
def bodies(draw: Any) -> tuple[bytes, dict[str, str]]:
    """A body and the headers that go with it."""
    kind = draw(
        st.sampled_from(["none", "noise", "json", "call", "calls", "twilio", "big", "email"])
    )
    headers: dict[str, str] = {}
    if kind == "none":
        return b"", headers
    if kind == "noise":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "call":
        body = json.dumps(draw(messages("call", FUZZ_WORLD, st.just(b"x")))).encode()
    elif kind == "calls":
        body = json.dumps(draw(st.lists(valid_call(FUZZ_WORLD), max_size=3))).encode()
    elif kind == "twilio":
        body, _, signature = draw(twilio_form())
        headers["X-Twilio-Signature"] = signature
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif kind == "email":
        body = draw(raw_emails(FUZZ_WORLD))
    else:
        body = b"[" + b"1," * (MAX_BODY // 2) + b"1]"
    if "Content-Type" not in headers:
        headers["Content-Type"] = draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/json; charset=utf-8",
                    "application/x-www-form-urlencoded",
                    "text/plain",
                    "",
                    "application/json;;;",
                ]
            )
        )
    if draw(st.integers(0, 3)):
        headers["X-CRM-Webhook-Secret"] = draw(
            st.sampled_from([SECRET, SECRET, "wrong", "", SECRET + " ", "ä"])
        )
    bearer = draw(st.sampled_from(["admin", "admin", "ingest", "none", "wrong", "odd"]))
    if bearer in BEARER:
        headers["Authorization"] = f"Bearer {BEARER[bearer]}"
    elif bearer == "wrong":
        headers["Authorization"] = "Bearer crm_" + draw(st.text("abcXYZ019-_", max_size=43))
    elif bearer == "odd":
        headers["Authorization"] = draw(
            st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
        )
    return body, headers


CDR_COLUMNS = ["src", "dst", "start", "answer", "end", "duration", "billsec", "disposition"]
CDR_COLUMNS += ["uniqueid", "channel", "dstchannel", "accountcode", "userfield", "lastapp"]


@st.composite
def targeted(draw: Any) -> RawRequest:
    """A request to an endpoint with its secret and content type right: what the body holds
    decides the answer (200 and enqueued, or 400 with the reason)."""
    endpoint = draw(st.sampled_from(["/calls", "/calls", "/asterisk/cdr", "/twilio/status"]))
    headers = {"Content-Type": "application/json", "X-CRM-Webhook-Secret": SECRET}
    if endpoint == "/calls":
        body = json.dumps(
            draw(
                messages("call", FUZZ_WORLD, st.just(b"x"))
                | st.lists(valid_call(FUZZ_WORLD), min_size=1, max_size=3)
            )
        ).encode()
    elif endpoint == "/asterisk/cdr":
        row = st.dictionaries(
            st.sampled_from(CDR_COLUMNS) | st.text(max_size=8),
            st.sampled_from(["ANSWERED", "NO ANSWER", "201", "0401234567", "2026-11-23 10:00:00"])
            | st.text(max_size=20)
            | json_values,
            max_size=10,
        )
        body = json.dumps(draw(row | st.lists(row, max_size=3))).encode()
        endpoint += draw(
            st.sampled_from(["", "?time_zone=Europe/Helsinki", "?time_zone=Mars/Base"])
        )
    else:
        body, _, signature = draw(twilio_form())
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        }
    lines = [f"POST {endpoint} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return RawRequest(head + body, complete=True, method="POST")


@st.composite
def requests(draw: Any) -> RawRequest:
    if draw(st.integers(0, 2)) == 0:
        return draw(targeted())
    if draw(st.integers(0, 9)) == 0:
        # Not HTTP at all: whatever the gateway does, it must neither hang nor fall over.
        return RawRequest(draw(st.binary(max_size=300)), complete=False)
    method = draw(methods)
    path = draw(paths)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x"]))
    body, headers = draw(bodies())
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["X-Odd", "Expect", "Connection", "Transfer-Encoding"]))
        value = draw(
            st.sampled_from(["100-continue", "close", "keep-alive", "identity", "gzip", "ä"])
            | st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30)
        )
        lines.append(f"{name}: {value}")
    if draw(st.integers(0, 12)) == 0:
        lines.append("X-Huge: " + "h" * draw(st.sampled_from([8000, 70_000])))
    framing = draw(
        st.sampled_from(
            ["exact", "exact", "exact", "chunked", "short", "long", "garbage", "twice", "absent"]
        )
    )
    complete = True
    declared = -1  # the body length the headers announce (-1: none, or not a number)
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        size = draw(st.integers(1, 64))
        chunks = b"".join(
            f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
            for i in range(0, len(body), size)
        )
        ending = draw(st.sampled_from([b"0\r\n\r\n", b"0\r\n\r\n", b"zz\r\n", b""]))
        payload = chunks + ending
        complete = ending != b""
    else:
        payload = body
        if framing == "exact":
            declared = len(body)
        elif framing == "short":
            declared = max(0, len(body) - draw(st.integers(1, 20)))
        elif framing == "long":
            declared = len(body) + draw(st.integers(1, 1000))
            complete = False
        if declared >= 0:
            lines.append(f"Content-Length: {declared}")
        elif framing == "garbage":
            # Waitress reads " 5" and "+4" as numbers: then the body may fall short of them.
            lies = {"abc": 0, "-1": 0, "1e3": 0, " 5": 5, "+4": 4, "99999999999999999999": 0}
            lie = draw(st.sampled_from(sorted(lies)))
            lines.append(f"Content-Length:{lie}")
            complete = len(body) >= lies[lie]
        elif framing == "twice":
            lines.append(f"Content-Length: {len(body)}")
            lines.append(f"Content-Length: {len(body) + 1}")
    if framing != "chunked" and declared <= 0:
        # Waitress never answers an empty-bodied request that expects 100-continue:
        # test_expect_continue_without_a_body covers that case on its own.
        lines = [line for line in lines if "100-continue" not in line.lower()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return RawRequest(head + payload, complete=complete, method=method)


# -- the client ---------------------------------------------------------------------------------


def exchange(port: int, request: RawRequest) -> int | None:
    """Send the request; the answer's status, or None when the gateway closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN_S) as sock:
        try:
            sock.sendall(request.data)
            if not request.complete:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            # It stopped reading and answered already (a header or body over its limit):
            # writing fails (EPIPE, ECONNRESET) or the socket is no longer connected (ENOTCONN)
            # when half-closing it. The answer may still be there to read.
            pass
        response = http.client.HTTPResponse(sock, method=request.method)
        try:
            response.begin()
            response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        except http.client.BadStatusLine as exc:
            raise AssertionError(f"not an HTTP answer: {exc!r}") from exc
        finally:
            response.close()
        return response.status


@settings(max_examples=examples(120))
@given(request=requests())
def test_every_request_is_answered(http_gateway: Gateway, request: RawRequest) -> None:
    try:
        status = exchange(http_gateway.port, request)
    except TimeoutError as exc:
        raise AssertionError(f"no answer within {ANSWER_WITHIN_S} s") from exc
    assert http_gateway.process.poll() is None, "the gateway exited"
    if status is None:
        assert not request.complete or b"X-Huge" in request.data, "closed without an answer"
        return
    assert 200 <= status < 600, status
    assert status != 500, "an internal error: see the gateway log for the traceback"


def test_gateway_still_works_after_fuzzing(http_gateway: Gateway, fuzz_root: Path) -> None:
    """Runs after the fuzzing above: the gateway is up, healthy and enqueues a valid call."""
    assert http_gateway.process.poll() is None
    assert http_gateway.request("GET", "/healthz") == (
        200,
        {"status": "ok", "database": "ok", "broker": "ok"},
    )
    call = {
        "schema": "crm.call/1",
        "source_system": "fuzz",
        "call_id": "after-fuzzing",
        "status": "completed",
        "from": "+358 40 900 0001",
    }
    status, reply = http_gateway.request(
        "POST",
        "/calls",
        json.dumps(call).encode(),
        {"Content-Type": "application/json", "X-CRM-Webhook-Secret": SECRET},
    )
    assert status == 200, reply
    [task_id] = reply["task_ids"]
    queued = list((fuzz_root / "http-gateway" / "broker" / "queue").glob("*.msg"))
    assert any(task_id in path.read_text() for path in queued), "the call was not enqueued"
    # The fuzzing reached the broker too: valid calls and correctly signed Twilio posts.
    assert len(queued) > 5, f"only {len(queued) - 1} fuzzed request(s) were enqueued"
    assert "Traceback" not in http_gateway.log.read_text(errors="replace")


@pytest.mark.parametrize("length", ["Content-Length: 0\r\n", ""])
def test_expect_continue_without_a_body(http_gateway: Gateway, length: str) -> None:
    request = RawRequest(
        (
            "POST /calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Expect: 100-continue\r\n{length}\r\n"
        ).encode(),
        complete=True,
        method="POST",
    )
    with socket.create_connection(("127.0.0.1", http_gateway.port), timeout=2) as sock:
        sock.sendall(request.data)
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()  # skips the 100 Continue; waitress alone stalled here
        finally:
            response.close()
        assert response.status == 401
