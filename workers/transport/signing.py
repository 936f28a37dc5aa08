"""Signed messages: with ``CRM_SIGNING_*`` set, every process signs what it publishes and
accepts only what a trusted certificate signed (Celery's ``auth`` serializer, JSON inside).

:func:`configure_signing` switches an app to signed messages; every process builds its app with
``workers.app.create_app``, so the worker, beat, Flower, the gateways and the command line all
sign what they publish and accept only what is signed.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from kombu.serialization import registry

from config.settings import Settings

JSON_CONTENT_TYPE = "application/json"
#: The content type of Celery's ``auth`` (signing) serializer.
SIGNED_CONTENT_TYPE = "application/data"


def accepted_content_type(settings: Settings) -> str:
    return SIGNED_CONTENT_TYPE if settings.signing_enabled else JSON_CONTENT_TYPE


# -- the serializer ------------------------------------------------------------------------------


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
