"""The one place that reads ``CRM_*`` environment variables.

``load_settings()`` builds a frozen :class:`Settings` once; every bad variable is reported together
in one :class:`ConfigError`. Tests build ``Settings`` directly (``Settings.embedded(tmp_path)`` or
``dataclasses.replace``) instead of touching the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

PREFIX = "CRM_"

DEFAULT_FREE_MAIL_DOMAINS = (
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "msn.com",
    "yahoo.com",
    "icloud.com",
    "me.com",
    "aol.com",
    "proton.me",
    "protonmail.com",
    "gmx.com",
    "luukku.com",
    "suomi24.fi",
    "kolumbus.fi",
    "elisanet.fi",
    "welho.com",
)


class ConfigError(ValueError):
    """One or more ``CRM_*`` variables are invalid; the message lists all of them."""


@dataclass(frozen=True)
class Settings:
    """Typed, immutable configuration of every process (worker, beat, gateways, command line)."""

    #: Directory for the embedded default's SQLite file, broker folders and document files.
    data_dir: Path = Path("var")
    #: SQLAlchemy URL; empty means the embedded SQLite file ``<data_dir>/crm.sqlite3``.
    database_url: str = ""
    #: Celery broker URL; empty means the embedded filesystem transport under ``<data_dir>/broker``.
    broker_url: str = ""
    #: Redis for live seller-view notifications; empty means "the broker, if it is Redis".
    redis_url: str = ""
    time_zone: str = "Europe/Helsinki"
    phone_region: str = "FI"
    #: Our own phone numbers (switchboard, trunks): never a customer, never a lead.
    own_numbers: tuple[str, ...] = ("+358 9 111 000",)
    #: Addresses the email gateway accepts mail for; plus-addresses (crm+visit@) are included.
    crm_addresses: tuple[str, ...] = ("crm@myyntitalo.fi",)
    free_mail_domains: tuple[str, ...] = DEFAULT_FREE_MAIL_DOMAINS
    #: Plus-address tag -> category code (``crm+visit@`` -> ``customer_visit``).
    plus_address_categories: tuple[tuple[str, str], ...] = (
        ("visit", "customer_visit"),
        ("lead", "lead"),
        ("sales", "sales_action"),
    )
    max_email_bytes: int = 40 * 1024 * 1024
    max_attachment_bytes: int = 25 * 1024 * 1024
    #: "database" (transactional with the event) or "filesystem" (under ``document_dir``).
    document_store: str = "database"
    document_dir: Path | None = None
    #: Hard time limit of one task execution; the Redis visibility timeout must exceed it.
    task_time_limit_s: int = 300
    visibility_timeout_s: int = 3600
    max_retries: int = 5
    retry_backoff_max_s: int = 300
    worker_concurrency: int = 2
    log_level: str = "INFO"
    log_json: bool = False
    #: Outgoing mail for the managers' reports.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    report_from: str = "crm-reports@myyntitalo.fi"
    flower_basic_auth: str = field(default="", repr=False)

    # -- derived values -------------------------------------------------------------------------

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'crm.sqlite3').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost/"

    @property
    def embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem")

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def effective_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        if self.effective_broker_url.startswith(("redis://", "rediss://")):
            return self.effective_broker_url
        return ""

    @property
    def effective_document_dir(self) -> Path:
        return (self.document_dir or self.data_dir / "documents").resolve()

    @classmethod
    def embedded(cls, data_dir: Path, **overrides: Any) -> Settings:
        """Settings for the embedded default rooted at ``data_dir`` (used by tests and the demo)."""
        return cls(data_dir=Path(data_dir), **overrides)


# -- parsing ------------------------------------------------------------------------------------


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (true/false), got {raw!r}")


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _parse_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _parse_list(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected tag=category pairs separated by commas, got {item!r}")
        pairs.append((key.strip().lower(), value.strip()))
    return tuple(pairs)


def _parse_zone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {raw!r}") from exc
    return raw


def _parse_region(raw: str) -> str:
    region = raw.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown phone region {raw!r}")
    return region


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


_PARSERS: dict[str, Callable[[str], Any]] = {
    "data_dir": Path,
    "document_dir": Path,
    "time_zone": _parse_zone,
    "phone_region": _parse_region,
    "own_numbers": _parse_list,
    "crm_addresses": lambda raw: tuple(a.lower() for a in _parse_list(raw)),
    "free_mail_domains": lambda raw: tuple(d.lower() for d in _parse_list(raw)),
    "plus_address_categories": _parse_pairs,
    "max_email_bytes": _parse_positive_int,
    "max_attachment_bytes": _parse_positive_int,
    "document_store": _parse_choice("database", "filesystem"),
    "task_time_limit_s": _parse_positive_int,
    "visibility_timeout_s": _parse_positive_int,
    "max_retries": int,
    "retry_backoff_max_s": _parse_positive_int,
    "worker_concurrency": _parse_positive_int,
    "log_level": _parse_choice("DEBUG", "INFO", "WARNING", "ERROR"),
    "log_json": _parse_bool,
    "smtp_port": _parse_positive_int,
    "smtp_starttls": _parse_bool,
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``CRM_*`` variables, reporting every bad one at once."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    errors: list[str] = []
    known = {f.name for f in fields(Settings)}
    for name in known:
        raw = env.get(PREFIX + name.upper())
        if raw is None:
            continue
        parser = _PARSERS.get(name, str)
        try:
            values[name] = parser(raw)
        except ValueError as exc:
            errors.append(f"{PREFIX}{name.upper()}: {exc}")
    unknown = sorted(
        key for key in env if key.startswith(PREFIX) and key[len(PREFIX) :].lower() not in known
    )
    # Test-only variables are read by the test suite's own fixtures, not by the product.
    unknown = [key for key in unknown if not key.startswith(PREFIX + "TEST_")]
    for key in unknown:
        errors.append(f"{key}: unknown setting")
    settings = Settings(**values)
    if settings.visibility_timeout_s <= settings.task_time_limit_s + settings.retry_backoff_max_s:
        errors.append(
            "CRM_VISIBILITY_TIMEOUT_S must exceed CRM_TASK_TIME_LIMIT_S + CRM_RETRY_BACKOFF_MAX_S, "
            "or a slow task would be delivered twice"
        )
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return settings
