"""The one place that reads ``CRM_*`` environment variables.

``load_settings()`` builds a frozen :class:`Settings` once; every bad variable is reported together
in one :class:`ConfigError`. Tests build ``Settings`` directly (``Settings.embedded(tmp_path)`` or
``dataclasses.replace``) instead of touching the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

PREFIX = "CRM_"
#: The most messages a call or email task takes from its queue (a batch holds at most 1000).
MAX_DRAIN = 1000

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


def soft_time_limit(hard_s: int) -> int:
    """The soft limit of a task: 30 s before the hard one, or a quarter of it for short limits
    (a task then still has time to roll back and be recorded before its process is killed)."""
    return hard_s - min(30, max(1, hard_s // 4))


@dataclass(frozen=True)
class Settings:
    """Typed, immutable configuration of every process (worker, beat, gateways, command line)."""

    #: Directory for the embedded default's SQLite file, broker folders and document files.
    data_dir: Path = Path("var")
    #: SQLAlchemy URL; empty means the embedded SQLite file ``<data_dir>/crm.sqlite3``.
    #: The URLs may hold passwords: they are left out of the settings' repr.
    database_url: str = field(default="", repr=False)
    #: Celery broker URL; empty means the embedded filesystem transport under ``<data_dir>/broker``.
    broker_url: str = field(default="", repr=False)
    #: Redis for live seller-view notifications; empty means "the broker, if it is Redis".
    redis_url: str = field(default="", repr=False)
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
    #: An inbound call / email from a party matching no contact or customer becomes a lead
    #: (category lead), once per number or address. Emails to crm+lead@ are leads regardless.
    lead_from_unknown_calls: bool = False
    lead_from_unknown_emails: bool = False
    #: Internal calls (between our own numbers, extensions and staff phones) are stored, marked
    #: ``link_state`` internal, and left out of cards, tallies, targets and statistics unless
    #: this is on. Every process (workers, the HTTP service, the command line) must agree.
    count_internal_calls: bool = False
    #: The category of a meeting (an iCalendar invitation sent to the CRM address): ``auto``
    #: (customer_visit when the location names the customer, else crm_event) or a category.
    meeting_category: str = "auto"
    max_email_bytes: int = 40 * 1024 * 1024
    max_attachment_bytes: int = 25 * 1024 * 1024
    #: Caps on an email's MIME structure, checked before it is parsed.
    email_max_parts: int = 1000
    email_max_depth: int = 20
    #: The SMTP gateway sends a raw email inline up to this size, else stores it (``raw_ref``).
    email_inline_max_bytes: int = 1024 * 1024
    #: Emails accepted from one sender per window; more are rejected as a mail loop (0: off).
    email_sender_limit: int = 200
    email_sender_window_s: int = 3600
    #: "database" (transactional with the event) or "filesystem" (under ``document_dir``).
    document_store: str = "database"
    document_dir: Path | None = None
    #: Hard time limit of one task execution; the Redis visibility timeout must exceed it.
    task_time_limit_s: int = 300
    visibility_timeout_s: int = 3600
    max_retries: int = 5
    retry_backoff_max_s: int = 300
    #: A message delivered this many times without an outcome (its worker process died each
    #: time: killed, out of memory, crashed) is not run again on the next delivery but recorded
    #: as a failed message of kind ``poison``, so it cannot loop forever.
    max_deliveries: int = 5
    #: A call task takes up to this many call messages queued behind it and stores them with its
    #: own in one transaction (workers/transport/drain.py); 0: each call message alone.
    call_drain: int = 100
    #: The same for email tasks (the emails taken are 8 MiB in all at most).
    email_drain: int = 50
    worker_concurrency: int = 2
    #: Retention, in days (None: kept for ever), enforced nightly by ``crm.maintenance.retention``
    #: (tasks/retention.py): call recordings, raw emails, the attachments of emails and visits,
    #: the payloads of rejected and failed messages, the ledger's payloads of emails and parties.
    retain_recordings_days: int | None = None
    retain_raw_emails_days: int | None = None
    retain_attachments_days: int | None = None
    retain_rejected_days: int | None = 90
    retain_failed_days: int | None = 90
    retain_ledger_days: int | None = None
    log_level: str = "INFO"
    log_json: bool = False
    #: Outgoing mail for the managers' reports.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    report_from: str = "crm-reports@myyntitalo.fi"
    #: CA bundle that verifies the SMTP server's certificate under STARTTLS (default: the
    #: system's trusted CAs).
    smtp_ca_file: Path | None = None
    #: When the managers' target reports are due, in each manager's own time zone: weekly as
    #: ``<weekday> HH:MM`` (the week just closed), monthly as ``<day of month> HH:MM`` (the month
    #: just closed); ``off`` sends none of that kind.
    weekly_report_at: str = "mon 07:00"
    monthly_report_at: str = "1 07:00"
    #: The seller view's cards in display order, as ``category`` or ``category=Title`` items;
    #: empty means one card per category, titled with its type's name (CRM-tapahtumat, Liidit,
    #: Myyntitoimenpiteet, Asiakaskäynnit).
    seller_cards: tuple[tuple[str, str], ...] = ()
    #: ``user:password`` (several separated by commas) that Flower demands (docs/security.md).
    flower_basic_auth: str = field(default="", repr=False)
    #: Task events (what Flower's task list shows): ``always`` sends them from every worker and
    #: publisher; ``on-demand`` (the default) sends them only once a monitor asks for them
    #: (Flower does, every few seconds while it runs), sparing each message their cost otherwise.
    task_events: str = "on-demand"
    #: Message signing (docs/security.md): the private key that signs, its certificate, and the
    #: directory of certificates whose signatures are accepted. All three or none; when set,
    #: every process signs what it publishes and accepts only signed messages.
    signing_key: Path | None = None
    signing_cert: Path | None = None
    signing_cert_store: Path | None = None
    #: Telephony (docs/telephony.md). A recording URL is fetched by ``crm.ingest.recording``;
    #: off keeps it on the event as a link only.
    recording_fetch: bool = True
    #: Hosts or networks (``pbx.example.fi``, ``10.20.0.0/16``) a recording may be fetched from
    #: although they are not public addresses: the guard against server-side request forgery.
    recording_fetch_allow: tuple[str, ...] = ()
    #: Budget of one recording download (connect, redirects and body together).
    recording_fetch_timeout_s: int = 30
    #: Twilio's auth token: checks X-Twilio-Signature at the HTTP gateway (and fetches recordings).
    twilio_auth_token: str = field(default="", repr=False)
    #: Shared secret that JSON posts to the HTTP gateway carry in ``X-CRM-Webhook-Secret``.
    webhook_secret: str = field(default="", repr=False)
    #: The gateway's public URL as the telephony provider calls it (signatures cover the URL).
    public_base_url: str = ""
    #: Largest request body the HTTP service accepts (a raw email posted to /v1/emails may be
    #: up to CRM_MAX_EMAIL_BYTES).
    http_max_body_bytes: int = 1024 * 1024
    #: The whole of one request (headers and body) must reach the HTTP service within this.
    http_request_deadline_s: int = 30
    #: Event streams (the screens' live updates) one process of the HTTP service keeps open at
    #: once, and of them per token (a browser session counts as its token): 503 and 429 above,
    #: so that streams never take every connection from the API.
    http_max_streams: int = 800
    http_streams_per_token: int = 20
    #: An event stream ends after this long; the browser reconnects (reading the view again)
    #: and its token is asked again, so a forgotten or half-open stream holds no slot forever.
    http_stream_lifetime_s: int = 3600
    #: Signs browser sessions of the HTTP service; unset, a key made once and kept in the
    #: database, which every replica shares.
    session_secret: str = field(default="", repr=False)

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
    def signing_enabled(self) -> bool:
        return self.signing_key is not None

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


def _parse_days(raw: str) -> int | None:
    """A number of days to keep something, or ``off`` (kept for ever)."""
    if raw.strip().lower() in {"off", "never", ""}:
        return None
    return _parse_positive_int(raw)


def _parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


#: The longest an event stream may be kept open (a week): a larger number is surely a mistake.
MAX_STREAM_LIFETIME_S = 7 * 24 * 3600


def _parse_stream_lifetime(raw: str) -> int:
    value = int(raw)
    if not 0 < value <= MAX_STREAM_LIFETIME_S:
        raise ValueError(f"expected 1 to {MAX_STREAM_LIFETIME_S} seconds, got {raw!r}")
    return value


def _parse_drain(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= MAX_DRAIN:
        raise ValueError(f"expected 0 to {MAX_DRAIN}, got {raw!r}")
    return value


def _parse_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _parse_list(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"expected tag=category pairs separated by commas, got {item!r}")
        pairs.append((key.strip().lower(), value.strip()))
    return tuple(pairs)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def report_schedule(raw: str, kind: str) -> tuple[int, int, int] | None:
    """``mon 07:00`` (weekly) or ``1 07:00`` (monthly) as (day, hour, minute); None for ``off``.

    The weekly day is 0 for Monday; the monthly day is 1-28, so that every month has it.
    """
    text = raw.strip().lower()
    if text == "off":
        return None
    day_text, _, clock = text.partition(" ")
    hour_text, sep, minute_text = clock.strip().partition(":")
    if not sep or not hour_text.isdigit() or not minute_text.isdigit():
        raise ValueError(f"expected {'mon' if kind == 'weekly' else '1'} 07:00 or off, got {raw!r}")
    hour, minute = int(hour_text), int(minute_text)
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ValueError(f"not a time of day in {raw!r}")
    if kind == "weekly":
        if day_text not in WEEKDAYS:
            raise ValueError(f"expected a weekday ({', '.join(WEEKDAYS)}) in {raw!r}")
        return WEEKDAYS.index(day_text), hour, minute
    if not day_text.isdigit() or not 1 <= int(day_text) <= 28:
        raise ValueError(f"expected a day of the month 1-28 in {raw!r}")
    return int(day_text), hour, minute


def _parse_schedule(kind: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        report_schedule(raw, kind)
        return raw.strip().lower()

    return parse


def _parse_cards(raw: str) -> tuple[tuple[str, str], ...]:
    """``category``, ``category=Title``, ``class:code`` or ``class:code=Title`` items."""
    cards = []
    for item in _parse_list(raw):
        code, _, title = item.partition("=")
        code = code.strip()
        if (
            not code
            or code == "class:"
            or code.count(":") > 1
            or (":" in code and not code.startswith("class:"))
        ):
            raise ValueError(
                f"expected category, category=Title, class:code or class:code=Title items,"
                f" got {item!r}"
            )
        cards.append((code, title.strip()))
    return tuple(cards)


_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _parse_fetch_allow(items: tuple[str, ...]) -> tuple[str, ...]:
    """Host names or IP networks; a bare address is a network of one."""
    allowed = []
    for item in items:
        try:
            allowed.append(str(ipaddress.ip_network(item, strict=False)))
            continue
        except ValueError:
            pass
        host = item.lower().rstrip(".")
        if not all(_HOST_LABEL.match(label) for label in host.split(".")):
            raise ValueError(f"expected host names or networks (10.0.0.0/8), got {item!r}")
        allowed.append(host)
    return tuple(allowed)


def _parse_base_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"expected an http(s) URL without query, got {raw!r}")
    return raw.strip().rstrip("/")


def _parse_basic_auth(raw: str) -> str:
    if not raw.strip():
        return ""
    for item in raw.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            # The value is a secret: never echoed in the error.
            raise ValueError("expected user:password (several separated by commas)")
    return raw.strip()


def _parse_readable_file(raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"no such file {raw!r}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {raw!r}: {exc.strerror}") from exc
    return path


def _parse_directory(raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw)
    if not path.is_dir():
        raise ValueError(f"no such directory {raw!r}")
    return path


def known_zone(name: str) -> ZoneInfo:
    """The time zone ``name`` names; ``ValueError`` (with the name, cut) when it names none.

    What zoneinfo raises for a name that is no zone depends on the name and on where the zone
    database is: ``ZoneInfoNotFoundError``, ``ValueError`` (a path, an empty name, a file that
    is not a zone), or ``OSError`` (a folder of the database such as ``Europe``, or a name too
    long for a file name, when it reads the tzdata package). Every one means unknown here.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name[:64]!r}") from exc


def _parse_zone(raw: str) -> str:
    known_zone(raw)
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


def _parse_folder(raw: str) -> Path:
    """A folder the product writes into (made when missing): not a file or a device."""
    path = Path(raw)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{raw[:200]!r} is not a directory")
    return path


#: The databases the product runs on (``dialect+driver://``): PostgreSQL, and SQLite embedded.
DATABASE_BACKENDS = ("postgresql", "sqlite")


def _parse_database_url(raw: str) -> str:
    """A SQLAlchemy URL of PostgreSQL or SQLite; what is wrong is said without the URL itself,
    which may hold a password."""
    scheme, found, _rest = raw.partition("://")
    if not raw:
        return raw
    if not found or scheme.split("+", 1)[0].lower() not in DATABASE_BACKENDS:
        shown = scheme[:40] if found else "none"
        raise ValueError(
            "a postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE (or sqlite:///FILE) URL; "
            f"its scheme here: {shown!r}"
        )
    return raw


_PARSERS: dict[str, Callable[[str], Any]] = {
    "database_url": _parse_database_url,
    "data_dir": _parse_folder,
    "document_dir": _parse_folder,
    "time_zone": _parse_zone,
    "phone_region": _parse_region,
    "own_numbers": _parse_list,
    "crm_addresses": lambda raw: tuple(a.lower() for a in _parse_list(raw)),
    "free_mail_domains": lambda raw: tuple(d.lower() for d in _parse_list(raw)),
    "plus_address_categories": _parse_pairs,
    "lead_from_unknown_calls": _parse_bool,
    "count_internal_calls": _parse_bool,
    "lead_from_unknown_emails": _parse_bool,
    "max_email_bytes": _parse_positive_int,
    "max_attachment_bytes": _parse_positive_int,
    "email_max_parts": _parse_positive_int,
    "email_max_depth": _parse_positive_int,
    "email_inline_max_bytes": _parse_positive_int,
    "email_sender_limit": int,
    "email_sender_window_s": _parse_positive_int,
    "document_store": _parse_choice("database", "filesystem"),
    "task_time_limit_s": _parse_positive_int,
    "visibility_timeout_s": _parse_positive_int,
    "max_retries": int,
    "retry_backoff_max_s": _parse_positive_int,
    "max_deliveries": _parse_positive_int,
    "call_drain": _parse_drain,
    "email_drain": _parse_drain,
    "worker_concurrency": _parse_positive_int,
    "retain_recordings_days": _parse_days,
    "retain_raw_emails_days": _parse_days,
    "retain_attachments_days": _parse_days,
    "retain_rejected_days": _parse_days,
    "retain_failed_days": _parse_days,
    "retain_ledger_days": _parse_days,
    "log_level": _parse_choice("DEBUG", "INFO", "WARNING", "ERROR"),
    "log_json": _parse_bool,
    "task_events": _parse_choice("on-demand", "always"),
    "smtp_port": _parse_positive_int,
    "smtp_starttls": _parse_bool,
    "recording_fetch": _parse_bool,
    "recording_fetch_allow": lambda raw: _parse_fetch_allow(_parse_list(raw)),
    "recording_fetch_timeout_s": _parse_positive_int,
    "public_base_url": _parse_base_url,
    "http_max_body_bytes": _parse_positive_int,
    "http_request_deadline_s": _parse_positive_int,
    "http_max_streams": _parse_positive_int,
    "http_streams_per_token": _parse_positive_int,
    "http_stream_lifetime_s": _parse_stream_lifetime,
    "smtp_ca_file": Path,
    "weekly_report_at": _parse_schedule("weekly"),
    "monthly_report_at": _parse_schedule("monthly"),
    "seller_cards": _parse_cards,
    "flower_basic_auth": _parse_basic_auth,
    "signing_key": _parse_readable_file,
    "signing_cert": _parse_readable_file,
    "signing_cert_store": _parse_directory,
}


#: The oldest SQLite the embedded database runs on: every store is an INSERT … RETURNING (3.35).
SQLITE_AT_LEAST = (3, 35, 0)


def sqlite_problem(settings: Settings, version: tuple[int, ...] | None = None) -> str | None:
    """Why the SQLite library (this Python's, or of ``version``) cannot hold ``settings``'
    database, if it is an SQLite one and cannot; None otherwise."""
    if not settings.effective_database_url.startswith("sqlite"):
        return None
    if version is None:
        import sqlite3  # here: a process on PostgreSQL has no use for it

        version = sqlite3.sqlite_version_info
    if version >= SQLITE_AT_LEAST:
        return None
    which = "set to an SQLite file" if settings.database_url else "unset (the embedded SQLite)"
    return (
        f"{PREFIX}DATABASE_URL: {which} needs SQLite {'.'.join(map(str, SQLITE_AT_LEAST))} or"
        f" later, and this Python's sqlite3 module has {'.'.join(map(str, version))}: use a"
        " PostgreSQL server, or a Python built with a newer SQLite"
    )


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
    signing = ("signing_key", "signing_cert", "signing_cert_store")
    given = [name for name in signing if env.get(PREFIX + name.upper())]
    if given and len(given) != len(signing):
        errors.append(
            "CRM_SIGNING_KEY, CRM_SIGNING_CERT and CRM_SIGNING_CERT_STORE go together; missing: "
            + ", ".join(PREFIX + name.upper() for name in signing if name not in given)
        )
    if (problem := sqlite_problem(settings)) is not None:
        errors.append(problem)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return settings
