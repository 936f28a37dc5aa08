"""Security settings are validated at start-up, secrets stay out of reprs, and a signed body must
be JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer

from config.settings import ConfigError, Settings, load_settings
from tests.integration.test_security_processes import make_identity
from workers.transport.consumer import describe_message, refused_content_reason
from workers.transport.signing import JsonOnlySecureSerializer


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, Path, Path]:
    key, cert = make_identity(tmp_path / "keys", "crm")
    store = tmp_path / "trusted"
    store.mkdir()
    (store / cert.name).write_bytes(cert.read_bytes())
    return key, cert, store


def test_signing_settings_go_together(identity: tuple[Path, Path, Path]) -> None:
    key, cert, store = identity
    settings = load_settings(
        {
            "CRM_SIGNING_KEY": str(key),
            "CRM_SIGNING_CERT": str(cert),
            "CRM_SIGNING_CERT_STORE": str(store),
        }
    )
    assert settings.signing_enabled and settings.signing_cert_store == store
    assert not load_settings({}).signing_enabled
    assert not load_settings({"CRM_SIGNING_KEY": "", "CRM_SIGNING_CERT": ""}).signing_enabled
    with pytest.raises(ConfigError) as error:
        load_settings({"CRM_SIGNING_KEY": str(key)})
    assert "missing: CRM_SIGNING_CERT, CRM_SIGNING_CERT_STORE" in str(error.value)


def test_signing_paths_must_exist(tmp_path: Path, identity: tuple[Path, Path, Path]) -> None:
    _key, cert, _store = identity
    with pytest.raises(ConfigError) as error:
        load_settings(
            {
                "CRM_SIGNING_KEY": str(tmp_path / "nope.key"),
                "CRM_SIGNING_CERT": str(tmp_path),
                "CRM_SIGNING_CERT_STORE": str(cert),
            }
        )
    text = str(error.value)
    assert "CRM_SIGNING_KEY: no such file" in text
    assert "CRM_SIGNING_CERT: no such file" in text
    assert "CRM_SIGNING_CERT_STORE: no such directory" in text


def test_flower_credentials_are_checked_without_being_echoed() -> None:
    assert load_settings({"CRM_FLOWER_BASIC_AUTH": "admin:pw1,ops:pw2"}).flower_basic_auth
    with pytest.raises(ConfigError) as error:
        load_settings({"CRM_FLOWER_BASIC_AUTH": "admin-S3cretNoColon"})
    assert "CRM_FLOWER_BASIC_AUTH" in str(error.value)
    assert "S3cret" not in str(error.value)


def test_settings_repr_holds_no_secret() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://crm:db-S3cret@db/crm",
        broker_url="redis://:redis-S3cret@redis:6379/0",
        redis_url="redis://:redis-S3cret@redis:6379/1",
        smtp_password="smtp-S3cret",
        flower_basic_auth="admin:flower-S3cret",
        twilio_auth_token="twilio-S3cret",
        webhook_secret="hook-S3cret",
    )
    assert "S3cret" not in repr(settings)
    assert "S3cret" not in str(settings)


class MkdirWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_a_signed_pickle_is_refused_unopened(
    identity: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    key, cert, store = identity
    parts = (
        PrivateKey(key.read_text()),
        Certificate(cert.read_text()),
        FSCertStore(str(store)),
        "sha256",
    )
    marker = tmp_path / "unpickled"
    signed_pickle = SecureSerializer(*parts, serializer="pickle").serialize(
        [[MkdirWhenUnpickled(marker)], {}, {}]
    )
    with pytest.raises(SecurityError, match="the signed body is 'application/x-python-serialize'"):
        JsonOnlySecureSerializer(*parts, serializer="json").deserialize(signed_pickle)
    assert not marker.exists()
    # Signed JSON passes, as before.
    ours = JsonOnlySecureSerializer(*parts, serializer="json")
    assert ours.deserialize(ours.serialize([["x"], {}, {}])) == [["x"], {}, {}]


class FakeMessage:
    """Just the attributes a refused kombu message has (no broker is involved here)."""

    def __init__(self, body: Any, content_type: str | None, headers: Any) -> None:
        self.body = body
        self.content_type = content_type
        self.content_encoding = "binary"
        self.headers = headers
        self.delivery_info = {"exchange": "crm.ingest.call", "routing_key": "crm.ingest.call"}


def test_description_is_json_and_bounded_whatever_the_headers() -> None:
    headers = {
        "task": "crm.ingest.call",
        "id": "x" * 500,
        "deep": [[[[[[[["z"]]]]]]]],
        "nul": "a\x00",
    }
    description = describe_message(FakeMessage("ä\udcff", "text/plain", headers))
    assert description["headers"]["nul"] == "a\u2400"
    assert len(description["headers"]["id"]) == 500
    assert description["body_size"] == len("ä".encode()) + 1
    reason = refused_content_reason("application/x-python-serialize", "application/json")
    assert "pickle" in reason and "not deserialised" in reason


def test_an_unusable_signing_key_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "store").mkdir()
    (tmp_path / "key.pem").write_text("not a key\n")
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
    env.update(
        CRM_DATA_DIR=str(tmp_path / "var"),
        CRM_SIGNING_KEY=str(tmp_path / "key.pem"),
        CRM_SIGNING_CERT=str(tmp_path / "cert.pem"),
        CRM_SIGNING_CERT_STORE=str(tmp_path / "store"),
    )
    example = Path(__file__).resolve().parents[2] / "examples/calls/inbound-answered.json"
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "publish", "call", str(example)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("crm-events: message signing: Invalid private key")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"CRM_DATABASE_URL": "foo"}, "CRM_DATABASE_URL: a postgresql+psycopg://"),
        ({"CRM_DATABASE_URL": "mysql://crm:db-S3cret@db/crm"}, "its scheme here: 'mysql'"),
        ({"CRM_DATA_DIR": "/dev/null"}, "CRM_DATA_DIR: '/dev/null' is not a directory"),
        ({"CRM_DOCUMENT_DIR": "/dev/null"}, "CRM_DOCUMENT_DIR: '/dev/null' is not a directory"),
    ],
)
def test_a_database_or_folder_the_product_cannot_use_is_a_configuration_error(
    env: dict[str, str], said: str
) -> None:
    """Said at start-up, with the setting's name (and never the URL's password), instead of
    the first command failing on it ('events failed: ArgumentError', 'FileExistsError')."""
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    assert said in str(refused.value)
    assert "S3cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("CRM_HTTP_STREAM_LIFETIME_S", "0"),
        ("CRM_HTTP_STREAM_LIFETIME_S", "604801"),
        ("CRM_HTTP_STREAM_LIFETIME_S", "9" * 400),
        ("CRM_HTTP_MAX_STREAMS", "0"),
        ("CRM_HTTP_STREAMS_PER_TOKEN", "-1"),
    ],
)
def test_stream_limits_are_counts_and_a_lifetime_of_at_most_a_week(name: str, raw: str) -> None:
    """A stream's deadline is a time in the event loop: a lifetime past a float's range would
    fail every stream, where a bad setting is refused at start."""
    with pytest.raises(ConfigError, match=name):
        load_settings({name: raw})
