"""A time zone name that names no zone is bad input wherever it comes from: a party message,
a setting, the CDR import's option. Some of those names made zoneinfo raise OSError (a folder
of the zone database, a name too long for a file), which no caller expected."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, known_zone, load_settings
from models.invalid import MessageInvalid
from models.schemas.party import load_party_message

NOT_ZONES = ["Europe", "America", "A" * 300, "../etc/passwd", "", "Europe/../Europe/Helsinki"]


@pytest.mark.parametrize("name", NOT_ZONES)
def test_a_name_that_is_no_zone_is_unknown(name: str) -> None:
    with pytest.raises(ValueError, match=r"^unknown time zone ") as refused:
        known_zone(name)
    assert len(str(refused.value)) < 100


def test_a_zone_is_known() -> None:
    assert known_zone("Europe/Helsinki").key == "Europe/Helsinki"


@pytest.mark.parametrize("name", ["Europe", "A" * 300])
def test_a_staff_member_in_a_folder_of_zones_is_rejected_with_the_reason(name: str) -> None:
    message = {
        "schema": "crm.party/1",
        "source_system": "erp",
        "kind": "staff",
        "username": "tz",
        "name": "T Z",
        "email": "tz@example.fi",
        "role": "seller",
        "time_zone": name,
    }
    with pytest.raises(MessageInvalid) as refused:
        load_party_message(message)
    assert refused.value.errors == {"time_zone": [f"Unknown time zone {name[:64]!r}."]}


def test_a_setting_that_is_no_zone_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="CRM_TIME_ZONE: unknown time zone 'Europe'"):
        load_settings({"CRM_TIME_ZONE": "Europe"})
