"""The message path's guard: refused messages are recorded, never deserialised; signing by setting.

A worker accepts JSON task messages only (or, with ``CRM_SIGNING_*`` set, only messages signed
with Celery's ``auth`` serializer). Celery's own consumer would log a refused message (a pickle,
another content type, a body that does not decode, a message of an unknown task) and drop it;
:class:`RecordingConsumer` records each one as a ``rejected_message`` row first: the reason, the
task it named, and the body itself, base64-encoded up to :data:`BODY_KEEP_BYTES` with its size and
SHA-256, so that nothing is lost. The body of a refused content type is never decoded, so a
pickle is never unpickled, and a compressed body is expanded only up to a bound.

:func:`configure_signing` switches an app to signed messages; every process builds its app with
``workers.app.create_app``, so the worker, beat, Flower, the gateways and the command line all
sign what they publish and accept only what is signed.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import logging
import lzma
import time
import zlib
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from celery.worker.consumer import Consumer
from kombu import compression
from kombu.serialization import registry
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from config.settings import Settings
from models.db import create_db_engine, create_session_factory, transaction
from models.ledger import RejectedMessage
from tasks.store import record_delivery

log = logging.getLogger("crm.security")

JSON_CONTENT_TYPE = "application/json"
#: The content type of Celery's ``auth`` (signing) serializer.
SIGNED_CONTENT_TYPE = "application/data"
#: How much of a refused body is kept (base64) in its rejected_message row; the size and the
#: SHA-256 of the whole body are always kept.
BODY_KEEP_BYTES = 64 * 1024
#: Longest string kept from a refused message's headers.
HEADER_KEEP_CHARS = 2000
#: Recording a refused message is tried this often before the worker gives up on the database
#: and logs the description instead (the message is then acknowledged: a refused message must
#: not circle forever through a worker that cannot record it).
RECORD_ATTEMPTS = 3

KNOWN_CONTENT_TYPES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "YAML",
    "application/x-msgpack": "msgpack",
    SIGNED_CONTENT_TYPE: "signed (auth) or untyped data",
    "application/text": "text",
}


def accepted_content_type(settings: Settings) -> str:
    return SIGNED_CONTENT_TYPE if settings.signing_enabled else JSON_CONTENT_TYPE


# -- signing ------------------------------------------------------------------------------------


class JsonOnlySecureSerializer(SecureSerializer):
    """Celery's signing serializer, whose signed body must be JSON.

    Celery's own one decodes the signed body with whatever serializer the signer named; a
    signed pickle would be unpickled. A trusted signer has no reason to send one, so a signed
    body of any other type is refused like a bad signature.
    """

    def deserialize(self, data: Any) -> Any:
        try:
            content_type = self._unpack(data)["content_type"]
        except Exception as exc:
            raise SecurityError(f"Unable to deserialize: not a signed message ({exc})") from exc
        if content_type != JSON_CONTENT_TYPE:
            raise SecurityError(f"Unable to deserialize: the signed body is {content_type!r}")
        return super().deserialize(data)


def configure_signing(app: Celery, settings: Settings) -> None:
    """Sign every published message and accept only signed ones (Celery's ``auth`` serializer).

    The key signs; the certificate travels with each message as the signer's id; the store is
    the directory of certificates whose signatures are trusted. Kombu's serializer registry is
    process-wide, as is this switch.
    """
    assert settings.signing_key and settings.signing_cert and settings.signing_cert_store
    app.conf.update(
        task_serializer="auth",
        event_serializer="auth",
        accept_content=["auth"],
        security_key=str(settings.signing_key),
        security_certificate=str(settings.signing_cert),
        security_cert_store=str(settings.signing_cert_store),
        security_digest="sha256",
    )
    # Celery's setup checks the settings agree, disables every other decoder but JSON, and
    # registers its serializer, which is then replaced by the JSON-only one.
    app.setup_security(allowed_serializers=["json"], serializer="json")
    serializer = JsonOnlySecureSerializer(
        PrivateKey(settings.signing_key.read_text(encoding="ascii")),
        Certificate(settings.signing_cert.read_text(encoding="ascii")),
        FSCertStore(str(settings.signing_cert_store)),
        "sha256",
        serializer="json",
    )
    registry.register(
        "auth",
        serializer.serialize,
        serializer.deserialize,
        content_type=SIGNED_CONTENT_TYPE,
        content_encoding="utf-8",
    )


# -- compressed messages ------------------------------------------------------------------------


def decompressed_limit(settings: Settings) -> int:
    """The largest body a compressed message may expand to: an inline email at its size cap,
    base64-encoded, with room to spare."""
    return 2 * settings.max_email_bytes + 1024 * 1024


def bounded_decoder(factory: Callable[[], Any], limit: int) -> Callable[[bytes], bytes]:
    def decode(data: bytes) -> bytes:
        decompressor = factory()
        body: bytes = decompressor.decompress(data, limit + 1)
        if len(body) > limit:
            raise ValueError(f"the compressed body expands to more than {limit} bytes")
        if not decompressor.eof:
            raise ValueError("the compressed body is truncated")
        return body

    return decode


def install_bounded_decompression(limit: int) -> None:
    """Kombu decompresses a message (``compression`` header) before anything else looks at it,
    entirely in memory: a small compression bomb would exhaust the worker. Its decoders are
    replaced (process-wide) by ones that stop at ``limit``; the message is then refused and
    recorded as undecodable, its compressed body kept."""
    for content_type, factory, aliases in (
        ("application/x-gzip", zlib.decompressobj, ["gzip", "zlib"]),
        ("application/x-bz2", bz2.BZ2Decompressor, ["bzip2", "bzip"]),
        ("application/x-lzma", lzma.LZMADecompressor, ["lzma", "xz"]),
    ):
        compression.register(
            compression.get_encoder(content_type)[0],
            bounded_decoder(factory, limit),
            content_type,
            aliases=aliases,
        )
    # Methods whose decoder cannot be bounded here are refused outright.
    for content_type in set(compression._decoders) - {
        "application/x-gzip",
        "application/x-bz2",
        "application/x-lzma",
    }:
        compression._decoders[content_type] = _refuse_compression(content_type)


def _refuse_compression(content_type: str) -> Callable[[bytes], bytes]:
    def decode(data: bytes) -> bytes:
        raise ValueError(f"{content_type} compression is not accepted")

    return decode


# -- refused messages ---------------------------------------------------------------------------


def _bounded(value: Any, depth: int = 0) -> Any:
    """A header value as JSON the database keeps: bounded strings, no NULs, no deep nesting."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value[:HEADER_KEEP_CHARS].replace("\x00", "\u2400")
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth > 5:
        return repr(value)[:HEADER_KEEP_CHARS]
    if isinstance(value, list | tuple):
        return [_bounded(item, depth + 1) for item in list(value)[:100]]
    if isinstance(value, dict):
        return {
            str(_bounded(k, depth + 1)): _bounded(v, depth + 1)
            for k, v in list(value.items())[:100]
        }
    return repr(value)[:HEADER_KEEP_CHARS]


def _header(message: Any, name: str) -> str | None:
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    value = headers.get(name)
    return value[:100] if isinstance(value, str) and value else None


def describe_message(message: Any) -> dict[str, Any]:
    """Everything needed to understand (and recover) a refused message, as JSON.

    The body is kept as bytes, base64-encoded: it is not decoded, whatever its type. (When the
    transport could not even build a message, ``message`` is its raw form.)
    """
    body = getattr(message, "body", message)
    if isinstance(body, str):
        raw = body.encode("utf-8", "surrogateescape")
    elif isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
    else:  # a transport that already decoded the body: keep its representation
        raw = repr(body).encode("utf-8", "replace")
    delivery = getattr(message, "delivery_info", None)
    delivery = delivery if isinstance(delivery, dict) else {}
    return {
        "content_type": _bounded(getattr(message, "content_type", None)),
        "content_encoding": _bounded(getattr(message, "content_encoding", None)),
        "headers": _bounded(getattr(message, "headers", None) or {}),
        "exchange": _bounded(delivery.get("exchange")),
        "routing_key": _bounded(delivery.get("routing_key")),
        "body_size": len(raw),
        "body_sha256": hashlib.sha256(raw).hexdigest(),
        "body_truncated": len(raw) > BODY_KEEP_BYTES,
        "body_b64": base64.b64encode(raw[:BODY_KEEP_BYTES]).decode("ascii"),
    }


def refused_content_reason(content_type: str | None, accepted: str) -> str:
    shown = content_type or "(none)"
    kind = KNOWN_CONTENT_TYPES.get(shown)
    named = f"{shown!r} ({kind})" if kind else repr(shown)[:200]
    if accepted == SIGNED_CONTENT_TYPE:
        wanted = "only signed messages (the auth serializer, application/data) are accepted"
    else:
        wanted = "only application/json is accepted"
    return f"refused content type {named}: {wanted}; the body was not deserialised"


class MessageRecorder:
    """Writes refused messages to ``rejected_message`` from the worker's consumer process.

    The consumer is the parent of the pool processes: its engine holds no connection between
    records (NullPool), so a pool process forked later inherits none.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sessions: sessionmaker[Session] | None = None

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._sessions = create_session_factory(
                create_db_engine(self.settings, poolclass=NullPool)
            )
        return self._sessions

    def record(self, message: Any, reason: str, errors: dict[str, Any]) -> None:
        task_name = _header(message, "task") or "(unknown)"
        task_id = _header(message, "id")
        description = describe_message(message)
        log.warning("refused message %s of task %s: %s", task_id, task_name, reason)
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                with transaction(self.sessions) as session:
                    session.add(
                        RejectedMessage(
                            task_name=task_name,
                            task_id=task_id,
                            reason=_bounded(reason),
                            errors=_bounded(errors),
                            payload=description,
                        )
                    )
                    record_delivery(
                        session,
                        task_id=task_id,
                        task_name=task_name,
                        outcome="rejected",
                        detail=_bounded(reason),
                    )
                return
            except Exception as exc:
                if attempt == RECORD_ATTEMPTS:
                    # The log is the record of last resort: it holds the whole description.
                    log.critical(
                        "could not record a refused message (%s: %s); it was: %s %r",
                        type(exc).__name__,
                        exc,
                        reason,
                        description,
                    )
                    return
                time.sleep(0.2 * attempt)


class RecordingConsumer(Consumer):
    """Celery's consumer, recording every message it refuses before acknowledging it.

    Installed with the ``worker_consumer`` setting. The content type is checked before Celery
    looks at the message at all, so a refused body is never handed to a decoder.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: Settings = self.app.conf.crm_settings
        self.recorder = MessageRecorder(settings)
        self.accepted_content_type = accepted_content_type(settings)
        install_bounded_decompression(decompressed_limit(settings))

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        celery_handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            content_type = message.content_type
            if content_type != self.accepted_content_type:
                reason = refused_content_reason(content_type, self.accepted_content_type)
                return self.refuse(message, reason, {"content_type": content_type})
            try:
                return celery_handler(message)
            except Exception as exc:
                # A message of the right type whose headers or body are not a task message
                # (Celery would raise out of its consumer loop and receive it again).
                if message.acknowledged:
                    raise
                reason = f"not a task message: {type(exc).__name__}: {exc}"[:1000]
                return self.refuse(message, reason, {"exception": type(exc).__name__})

        return on_task_received

    def refuse(self, message: Any, reason: str, errors: dict[str, Any]) -> None:
        self.recorder.record(message, reason, errors)
        if hasattr(message, "ack") and not message.acknowledged:
            message.ack()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if self.accepted_content_type == SIGNED_CONTENT_TYPE:
            reason = f"the signature could not be verified: {exc}"
        else:
            content_type = getattr(message, "content_type", None)
            reason = f"the body could not be decoded as {content_type}: {exc}"
        self.refuse(message, reason[:1000], {"exception": type(exc).__name__})

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        reason = f"not a valid task message: {type(exc).__name__}: {exc}"[:1000]
        self.refuse(message, reason, {"exception": type(exc).__name__})

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refuse(message, "not a task message: it names no task", {})

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = _header(message, "task") or "(unknown)"
        self.refuse(message, f"no such task {name!r} on this worker", {})
