"""What any request may cost the service: a total deadline, a body limit, a JSON depth limit.

A socket timeout counts idle time: a client that sends one header line every few seconds is
never idle long enough to be dropped, and two hundred of them held the old gateway for good.
Here the deadline counts from the first byte of a request (or the connection, for the first
one) until the whole request, headers and body, has arrived; a request that has not arrived by
then is answered 408 and its connection closed (:class:`DeadlineProtocol`, given to uvicorn).
The application's work after that has no deadline of its own: its time is the service's.

Bodies are limited before they are read (``Content-Length``) and while they are read (a chunked
body); JSON is refused, 400, when it nests deeper than a message of ours ever does.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import h11
from starlette.convertors import IntegerConvertor, PathConvertor, register_url_convertor
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from models.jsondoc import read_json


class RowIdConvertor(IntegerConvertor):
    """``{name:id}`` in a route: a row id of at most 18 digits. A longer one names no row and
    would not even convert (Python refuses over 4,300 digits): the route does not match it,
    and the answer is a 404 like any unknown path. A handler answers 404 itself for an id over
    ``models.limits.MAX_ROW_ID``, which would fail the database's statement."""

    regex = "[0-9]{1,18}"


register_url_convertor("id", RowIdConvertor())


class NameConvertor(PathConvertor):
    """``{name:name}`` in a route: a username or customer number, which may hold '/' (a link
    quotes it as %2F, but the path is decoded before it is routed). It neither begins nor ends
    with '/': ``/sellers/anna/`` is ``/sellers/anna`` with a trailing slash (redirected)."""

    regex = "[^/](?:.*[^/])?"


register_url_convertor("name", NameConvertor())

#: The whole of one request (headers and body) must arrive within this many seconds
#: (CRM_HTTP_REQUEST_DEADLINE_S).
REQUEST_DEADLINE_S = 30.0


class Problem(Exception):
    """An answer other than success: a status and a JSON document with the reason."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.document = {"error": error, **extra}
        self.headers: dict[str, str] = {}


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, where a request must arrive whole within its deadline."""

    deadline_s = REQUEST_DEADLINE_S

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline: Any = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.deadline_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on a kept-alive connection starts its own clock
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # all of it is here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the keep-alive timeout takes over until the next request begins

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request that is not HTTP: answered 400 (JSON) and the connection closed. A request
        of the same connection that the application is still answering is dropped first, so
        that its answer cannot collide with this one."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            if self.conn.our_state is not h11.SEND_RESPONSE:
                self.transport.close()  # its answer had begun: nothing more can be said
                return
        body = json.dumps({"error": f"not a valid HTTP request: {msg}"}).encode()
        try:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
        finally:
            self.transport.close()

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The headers are in and the application is waiting for the body: it sees the
            # client gone (and answers nothing more), and the client is told why, unless an
            # answer had begun.
            cycle.disconnected = True
            cycle.message_event.set()
            if self.conn.our_state is not h11.SEND_RESPONSE:
                self.transport.close()
                return
        body = json.dumps(
            {"error": f"the request did not arrive within {self.deadline_s:g} s"}
        ).encode()
        try:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
        finally:
            self.transport.close()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 otherwise, before or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise Problem(400, "malformed Content-Length")
        if int(declared) > limit:
            raise Problem(413, f"the body is over {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """The JSON document of a body, nested no deeper than a message of ours (400 otherwise)."""
    try:
        return read_json(body)
    except ValueError as exc:
        raise Problem(400, str(exc)) from exc


def form_fields(
    text: str, max_fields: int, what: str = "form", *, keep_blank: bool = False
) -> list[tuple[str, str]]:
    """The ``name=value`` pairs of a form or a query string; 400 for one of more than
    ``max_fields`` fields."""
    try:
        return parse_qsl(text, keep_blank_values=keep_blank, max_num_fields=max_fields)
    except ValueError as exc:
        raise Problem(400, f"unreadable {what}: {exc}") from exc


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
