"""Twilio status callbacks and Asterisk CDRs as crm.call/1 updates; Twilio's signature."""

from __future__ import annotations

import csv
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from models.schemas.call import SCHEMA, CallMessageSchema
from models.schemas.common import load_message
from tasks.telephony.adapters import (
    CDR_LAYOUTS,
    AdapterError,
    CdrContext,
    _cdr_time,
    asterisk_cdr_to_call,
    read_cdr_csv,
    twilio_to_call,
)
from tests.conftest import EXAMPLES
from workers.cli.telephony import cdr_messages
from workers.gateways.http.webhooks import twilio_signature, url_variants, valid_twilio_signature

CONTEXT = CdrContext(own_numbers=("+358 9 111 000",))


def twilio(**fields: str) -> dict[str, str]:
    return {
        "AccountSid": "AC0000000000000000000000000000demo",
        "CallSid": "CA11",
        "Direction": "inbound",
        "From": "+358447654321",
        "To": "+35891110000",
        **fields,
    }


@pytest.mark.parametrize(
    ("twilio_status", "status"),
    [
        ("queued", "ringing"),
        ("ringing", "ringing"),
        ("in-progress", "answered"),
        ("completed", "completed"),
        ("busy", "busy"),
        ("failed", "failed"),
        ("no-answer", "missed"),
        ("canceled", "missed"),
        ("some-new-status", "some-new-status"),
    ],
)
def test_twilio_statuses(twilio_status: str, status: str) -> None:
    message = twilio_to_call(twilio(CallStatus=twilio_status))
    assert message["status"] == status
    load_message(CallMessageSchema(), message, SCHEMA)  # always a valid crm.call/1


@pytest.mark.parametrize(
    ("direction", "ours"),
    [("inbound", "inbound"), ("outbound-api", "outbound"), ("outbound-dial", "outbound")],
)
def test_twilio_directions(direction: str, ours: str) -> None:
    assert twilio_to_call(twilio(Direction=direction, CallStatus="ringing"))["direction"] == ours


def test_twilio_fields() -> None:
    message = twilio_to_call(
        twilio(
            CallStatus="completed",
            Timestamp="Wed, 25 Nov 2026 08:36:44 +0000",
            SequenceNumber="2",
            CallDuration="398",
            RecordingUrl="https://api.twilio.com/2010-04-01/Accounts/AC1/Recordings/RE1",
        )
    )
    assert message == {
        "schema": "crm.call/1",
        "source_system": "twilio",
        "call_id": "CA11",
        "direction": "inbound",
        "from": "+358447654321",
        "to": "+35891110000",
        "sequence": 2,
        "status": "completed",
        "ended_at": "2026-11-25T08:36:44+00:00",
        "duration_s": 398,
        "recording": {"url": "https://api.twilio.com/2010-04-01/Accounts/AC1/Recordings/RE1"},
    }
    # The time of each status: started, answered, ended.
    ringing = twilio_to_call(
        twilio(CallStatus="ringing", Timestamp="Wed, 25 Nov 2026 08:30:01 +0000")
    )
    assert ringing["started_at"] == "2026-11-25T08:30:01+00:00"
    answered = twilio_to_call(
        twilio(CallStatus="in-progress", Timestamp="Wed, 25 Nov 2026 10:30:09 +0200")
    )
    assert answered["answered_at"] == "2026-11-25T10:30:09+02:00"


def test_twilio_child_leg_merges_into_its_parent() -> None:
    leg = twilio_to_call(
        {
            "CallSid": "CA22",
            "ParentCallSid": "CA11",
            "CallStatus": "in-progress",
            "Direction": "outbound-dial",
            "From": "+35891110000",
            "To": "client:mikko",
            "SequenceNumber": "1",
            "Timestamp": "Wed, 25 Nov 2026 08:30:09 +0000",
        }
    )
    assert leg["call_id"] == "CA11"
    assert leg["agent"] == "mikko"
    assert leg["status"] == "answered"
    assert "from" not in leg and "to" not in leg and "direction" not in leg
    assert "sequence" not in leg  # a leg's counter is not the parent's
    unanswered = twilio_to_call(
        {
            "CallSid": "CA23",
            "ParentCallSid": "CA11",
            "CallStatus": "no-answer",
            "To": "+358501112222",
        }
    )
    # One leg that nobody answered does not make the whole call missed.
    assert unanswered["status"] == "leg no-answer"
    assert unanswered["agent"] == "+358501112222"


def test_twilio_garbage_is_tolerated_or_refused_with_a_reason() -> None:
    odd = twilio_to_call(
        twilio(CallStatus="completed", Timestamp="yesterday", SequenceNumber="x", CallDuration="-4")
    )
    assert "ended_at" not in odd and "sequence" not in odd and "duration_s" not in odd
    with pytest.raises(AdapterError, match="CallSid"):
        twilio_to_call({"CallStatus": "completed"})
    # Characters str.isdigit() takes but int() refuses or reads as digits of another script.
    unreadable = twilio_to_call(
        twilio(
            CallStatus="completed",
            Timestamp="Wed, ٢٥ Nov 2026 08:36:44 +0000",
            SequenceNumber="٢",
            CallDuration="²",
        )
    )
    assert "ended_at" not in unreadable and "sequence" not in unreadable
    assert "duration_s" not in unreadable
    # A repeated field counts once (its first value).
    repeated = twilio_to_call(
        [("CallSid", "CA1"), ("CallStatus", "busy"), ("CallStatus", "completed")]
    )
    assert repeated["status"] == "busy"


def cdr(**fields: Any) -> dict[str, Any]:
    base = {
        "src": "0401234567",
        "dst": "202",
        "dcontext": "from-pstn",
        "clid": '"Matti Virtanen" <0401234567>',
        "channel": "PJSIP/trunk-00000a1",
        "dstchannel": "PJSIP/202-00000a2",
        "start": "2026-11-26 10:05:00",
        "answer": "2026-11-26 10:05:07",
        "end": "2026-11-26 10:09:47",
        "duration": "287",
        "billsec": "280",
        "disposition": "ANSWERED",
        "uniqueid": "1764144300.161",
    }
    return {**base, **fields}


@pytest.mark.parametrize(
    ("disposition", "status"),
    [
        ("ANSWERED", "completed"),
        ("NO ANSWER", "missed"),
        ("BUSY", "busy"),
        ("FAILED", "failed"),
        ("CONGESTION", "failed"),
        ("WEIRD", "weird"),
    ],
)
def test_asterisk_dispositions(disposition: str, status: str) -> None:
    message = asterisk_cdr_to_call(cdr(disposition=disposition), CONTEXT)
    assert message["status"] == status
    load_message(CallMessageSchema(), message, SCHEMA)
    if status != "completed":
        assert "answered_at" not in message and "duration_s" not in message


def test_asterisk_fields_and_naive_times() -> None:
    assert asterisk_cdr_to_call(cdr(), CONTEXT) == {
        "schema": "crm.call/1",
        "source_system": "asterisk",
        "call_id": "1764144300.161",
        "status": "completed",
        "direction": "inbound",
        "from": "0401234567",
        "to": "202",
        "agent": "202",
        "started_at": "2026-11-26T10:05:00",
        "answered_at": "2026-11-26T10:05:07",
        "ended_at": "2026-11-26T10:09:47",
        "duration_s": 280,
    }
    utc = asterisk_cdr_to_call(cdr(), CdrContext(time_zone="UTC"))
    assert utc["started_at"] == "2026-11-26T10:05:00+00:00"


@pytest.mark.parametrize(
    "zone",
    ["UTC", "Europe/Helsinki", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"],
)
def test_cdr_times_in_a_zone_are_written_as_the_zone_writes_them(zone: str) -> None:
    """The offset read once an hour gives what the zone gives each time: across both of the
    year's changes (a missing hour, an hour twice, a half-hour shift), in the old local mean
    time, and with fractions of a second."""
    context = CdrContext(time_zone=zone)
    days = [date(2026, 3, 8), date(2026, 3, 29), date(2026, 4, 5), date(2026, 10, 4)]
    days += [date(2026, 10, 25), date(2026, 11, 1), date(1883, 11, 18), date(1921, 4, 30)]
    moments = [
        datetime.combine(day, time()) + timedelta(minutes=minute, seconds=minute % 60)
        for day in days
        for minute in range(0, 36 * 60, 7)
    ]
    for moment in moments:
        for text in (f"{moment:%Y-%m-%d %H:%M:%S}", f"{moment:%Y-%m-%dT%H:%M:%S}.25"):
            expected = datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).isoformat()
            assert _cdr_time({"start": text}, "start", context) == expected, text


def test_asterisk_direction_agent_and_legs() -> None:
    out = asterisk_cdr_to_call(
        cdr(
            src="201",
            dst="0447654321",
            dcontext="from-internal",
            channel="PJSIP/201-0001",
            dstchannel="PJSIP/trunk-0002",
        ),
        CONTEXT,
    )
    assert (out["direction"], out["agent"]) == ("outbound", "201")
    # The caller id when src is empty; the agent from the channel when dst is a DID.
    did = asterisk_cdr_to_call(
        cdr(src="", dst="+35891110000", dstchannel="SIP/anna-0000001f"), CONTEXT
    )
    assert (did["from"], did["direction"], did["agent"]) == ("0401234567", "inbound", "anna")
    # Legs of one call share linkedid.
    leg = asterisk_cdr_to_call(cdr(uniqueid="1764144300.162", linkedid="1764144300.161"), CONTEXT)
    assert leg["call_id"] == "1764144300.161"
    internal = asterisk_cdr_to_call(cdr(src="201", dst="202"), CONTEXT)
    assert "direction" not in internal


def test_asterisk_bad_rows() -> None:
    with pytest.raises(AdapterError, match="start"):
        asterisk_cdr_to_call(cdr(start="26.11.2026 10:05"), CONTEXT)
    with pytest.raises(AdapterError, match="uniqueid"):
        asterisk_cdr_to_call({"src": "1", "dst": "2"}, CONTEXT)
    # Without an id, the same row always gets the same call id (a re-import is a duplicate).
    no_id = cdr(uniqueid="")
    assert (
        asterisk_cdr_to_call(no_id, CONTEXT)["call_id"]
        == asterisk_cdr_to_call(no_id, CONTEXT)["call_id"]
    )


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("start", "2026-02-30 10:00:00", "day is out of range for month"),
        ("start", "2026-13-45 10:05:00", "month must be in 1..12"),
        ("end", "2026-11-26 25:05:00", "hour must be in 0..23"),
        ("answer", "٢٠٢٦-11-26 10:05:00", r"\(YYYY-MM-DD HH:MM:SS\)"),
        ("billsec", "²", "not a number of seconds"),
        ("billsec", "-4", "not a number of seconds"),
    ],
)
def test_asterisk_unreadable_times_and_numbers_are_refused_with_a_reason(
    column: str, value: str, reason: str
) -> None:
    with pytest.raises(AdapterError, match=f"CDR {column} .*{reason}"):
        asterisk_cdr_to_call(cdr(**{column: value}), CONTEXT)


def master_csv_rows() -> list[str]:
    """The sample's two rows as Asterisk writes them (no header)."""
    return (EXAMPLES / "calls/asterisk-cdr.csv").read_text().splitlines()[1:]


def test_cdr_import_reports_each_unreadable_row_and_reads_the_others() -> None:
    answered, missed = master_csv_rows()
    bad_rows = [
        answered.replace("2026-11-26 10:05:00", "2026-02-30 10:00:00"),
        answered.replace("2026-11-26 10:05:00", "2026-13-45 10:05:00"),
        answered.replace("2026-11-26 10:05:00", "2026-11-26 25:05:00"),
        answered.replace("2026-11-26 10:05:00", "٢٠٢٦-11-26 10:05:00"),
        answered.replace(",280,", ',"²",'),
    ]
    text = "\n".join([answered, *bad_rows, missed]) + "\n"
    messages, errors = cdr_messages(text, CONTEXT, "f.csv")
    assert [(label, m["call_id"]) for label, m in messages] == [
        ("f.csv:1", "1764144300.161"),
        ("f.csv:7", "1764148800.170"),
    ]
    assert [(e["source"], e["line"]) for e in errors] == [(f"f.csv:{n}", n) for n in range(2, 7)]
    reasons = [e["error"] for e in errors]
    assert reasons[0] == (
        "CDR start '2026-02-30 10:00:00' is not a time: day is out of range for month"
    )
    assert "month must be in 1..12" in reasons[1] and "hour must be in 0..23" in reasons[2]
    assert reasons[3].startswith("CDR start") and reasons[4].startswith("CDR billsec")


def test_master_csv_reads_on_after_a_field_over_the_csv_limit() -> None:
    answered, missed = master_csv_rows()
    huge = answered.replace('""Matti Virtanen""', "x" * 200_000)
    # A CDR row is one line: a quoted field over several lines is a quote not closed on its
    # line, and each of the lines it would take is read on its own (each bad here too).
    huge_lines = answered.replace('""Matti Virtanen""', "a\n" + "x" * 200_000 + '\n"",b')
    two_lines = answered.replace('""Matti Virtanen""', "Matti\nVirtanen")
    text = "\n".join([answered, huge, missed, huge_lines, two_lines, missed]) + "\n"
    rows = list(read_cdr_csv(text))
    assert [(r.line, r.error) for r in rows] == [
        (1, ""),
        (2, "not CSV: field larger than field limit (131072)"),
        (3, ""),
        (4, "a quote opened on this line is not closed on it"),
        (5, "not CSV: field larger than field limit (131072)"),
        (6, "15 fields, expected 16-21"),
        (7, "a quote opened on this line is not closed on it"),
        (8, "14 fields, expected 16-21"),
        (9, ""),
    ]
    # An unterminated quote at the end of the file is reported, short or over the limit.
    short = list(read_cdr_csv(f'{answered}\n{missed}\n"only","two'))
    assert [(r.line, r.error) for r in short][1:] == [
        (2, ""),
        (3, "a quote opened on this line is not closed on it"),
    ]
    long = list(read_cdr_csv(f'{answered}\n{missed}\n"only","two\n{"y" * 200_000}\n'))
    assert [(r.line, r.error) for r in long][1:] == [
        (2, ""),
        (3, "a quote opened on this line is not closed on it"),
        (4, "not CSV: field larger than field limit (131072)"),
    ]


@pytest.mark.parametrize("after", [3, 2000])
def test_a_quote_left_open_mid_file_costs_its_own_row_only(after: int) -> None:
    """A row whose quote never closed took every later row into one bad row (or, past the CSV
    reader's field limit, the rest of the file): it is reported alone, the others are read."""
    answered, missed = master_csv_rows()
    assert answered.endswith(',""')
    broken = answered[:-2] + '"Matti V'  # the userfield's quote never closed
    # Rows as a PBX may write them, unquoted: no quote of theirs closes the one left open.
    plain = answered.replace("PJSIP/202,30", "PJSIP/202|30").replace('"', "")
    rows = [plain.replace("1764144300.161", f"1764144300.{n}") for n in range(after)]
    text = "\n".join([answered, broken, *rows, missed]) + "\n"
    read = list(read_cdr_csv(text))
    assert [(r.line, r.error) for r in read if r.error] == [
        (2, "a quote opened on this line is not closed on it")
    ]
    good = [r.fields["uniqueid"] for r in read if r.fields is not None]
    assert good == ["1764144300.161", *(f"1764144300.{n}" for n in range(after)), "1764148800.170"]
    assert [r.line for r in read if r.fields is not None] == [1, *range(3, after + 4)]


@pytest.mark.parametrize(
    "stray",
    [
        '"',  # a line of one quote: with the next row it made a row of the right length
        'x,"y',  # and this one shifted the next row's columns, silently
    ],
)
def test_a_stray_quote_never_changes_the_row_after_it(stray: str) -> None:
    answered, missed = master_csv_rows()
    read = list(read_cdr_csv("\n".join([answered, stray, missed, stray, answered]) + "\n"))
    assert [(r.line, r.error) for r in read if r.error] == [
        (2, "a quote opened on this line is not closed on it"),
        (4, "a quote opened on this line is not closed on it"),
    ]
    assert [r.fields for r in read if r.fields is not None] == [
        r.fields for r in read_cdr_csv("\n".join([answered, missed, answered]))
    ]


def test_master_csv_with_and_without_header() -> None:
    with_header = list(read_cdr_csv((EXAMPLES / "calls/asterisk-cdr.csv").read_text()))
    assert [r.line for r in with_header] == [2, 3]
    assert (
        with_header[0].fields is not None and with_header[0].fields["uniqueid"] == "1764144300.161"
    )
    # Asterisk itself writes no header: columns by count (18: uniqueid and userfield; 21: also
    # peeraccount, linkedid and sequence).
    raw = (EXAMPLES / "calls/asterisk-cdr.csv").read_text().splitlines()[1:]
    headerless = list(read_cdr_csv("\n".join(raw) + "\n"))
    assert [r.fields for r in headerless] == [r.fields for r in with_header]
    newcolumns = raw[0] + ',"","1764144300.100",7'
    row = next(read_cdr_csv(newcolumns))
    assert row.fields is not None and row.fields["linkedid"] == "1764144300.100"
    broken = list(read_cdr_csv('"a","b"\n\n' + raw[1] + "\n"))
    assert broken[0].error == "2 fields, expected 16-21"
    assert broken[1].fields is not None


def test_twilio_signature_matches_twilios_published_examples() -> None:
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+14158675309"),
        ("Digits", "1234"),
        ("From", "+14158675309"),
        ("To", "+18005551212"),
    ]
    assert twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert valid_twilio_signature("12345", url, params[::-1], "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    repeated = [
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
        ("Digits", "1234"),
    ]
    assert twilio_signature("12345", url, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert not valid_twilio_signature("12345", url + "&x=1", params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not valid_twilio_signature(
        "12345", url, [*params, ("Digits", "9")], "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    assert not valid_twilio_signature("", url, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not valid_twilio_signature("12345", url, params, "")
    assert not valid_twilio_signature("12345", url, params, "ääkköset")


def test_signature_url_with_and_without_the_default_port() -> None:
    assert url_variants("https://crm.example.fi/t?x=1") == [
        "https://crm.example.fi/t?x=1",
        "https://crm.example.fi:443/t?x=1",
    ]
    assert url_variants("https://crm.example.fi:443/t") == [
        "https://crm.example.fi:443/t",
        "https://crm.example.fi/t",
    ]
    assert url_variants("http://127.0.0.1:8080/t") == ["http://127.0.0.1:8080/t"]


def test_a_file_row_converts_as_the_same_cdr_posted_with_padded_names_and_values() -> None:
    """A Master.csv row skips the webhook's normalising of names and values (read_cdr_csv has
    done it): padded values, upper-case names or a header row give the same messages."""
    answered, missed = master_csv_rows()
    padded = answered.replace('"ANSWERED"', '" ANSWERED "').replace('"202"', '"  202 "')
    header = ",".join(f'" {name.upper()} "' for name in CDR_LAYOUTS[18])
    for text in (f"{padded}\n{missed}\n", f"{header}\n{padded}\n{missed}\n"):
        read = [row for row in read_cdr_csv(text) if row.fields is not None]
        columns = CDR_LAYOUTS[18]
        posted = [
            asterisk_cdr_to_call(
                {f" {k.upper()} ": f"  {v} " for k, v in zip(columns, values, strict=True)},
                CONTEXT,
            )
            for values in csv.reader(text.splitlines()[-2:])
        ]
        messages, errors = cdr_messages(text, CONTEXT, "f.csv")
        assert errors == []
        assert [m for _label, m in messages] == posted
        assert [r.fields["dst"] for r in read if r.fields] == ["202", "201"]
        assert messages[0][1]["status"] == "completed" and messages[0][1]["agent"] == "202"
