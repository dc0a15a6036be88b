"""Audience files read row by row: addresses, fields, and every bad row named with its line and reason."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd.jobs.audience import AudienceError, Recipient, Rejected, check_name, guess_format, read_csv, read_ndjson


def test_csv_rows_become_recipients_with_their_other_columns_as_fields():
    rows = list(read_csv(io.StringIO("name,token,lang\nAda,t1,en\nBo,t2,\n")))
    assert rows == [Recipient("t1", '{"lang":"en","name":"Ada"}'), Recipient("t2", '{"name":"Bo"}')]


def test_bad_csv_rows_are_rejected_by_line_and_the_import_goes_on():
    rows = list(read_csv(io.StringIO("token,name\n,nobody\nt1,a,extra\n\n t2 ,b\n")))
    assert rows == [Rejected(2, "no token", ",nobody"), Rejected(3, "3 columns where the header has 2", "t1,a,extra"),
                    Recipient("t2", '{"name":"b"}')]


def test_a_csv_without_an_address_column_stops_with_the_header_named():
    with pytest.raises(AudienceError, match="no address column: name one with --address"):
        list(read_csv(io.StringIO("name,city\nAda,Paris\n")))
    with pytest.raises(AudienceError, match="no column 'phone'"):
        list(read_csv(io.StringIO("token\nt1\n"), "phone"))


def test_ndjson_addresses_may_be_web_push_subscriptions_kept_as_canonical_json():
    text = ('{"subscription":{"keys":{"auth":"a","p256dh":"k"},"endpoint":"https://push.example/1"},"lang":"fr"}\n'
            '\n'
            'not json\n'
            '[1]\n'
            '{"user":"u9","n":3}\n'
            '{"user":true}\n')
    rows = list(read_ndjson(io.StringIO(text)))
    assert rows[0] == Recipient('{"endpoint":"https://push.example/1","keys":{"auth":"a","p256dh":"k"}}',
                                '{"lang":"fr"}')
    assert [(r.line, r.reason) for r in rows[1:3] if isinstance(r, Rejected)] == [(3, rows[1].reason),
                                                                                   (4, "not a JSON object")]
    assert rows[1].reason.startswith("not JSON")
    assert rows[3] == Recipient("u9", '{"n":3}')
    assert rows[4] == Rejected(6, "no user", '{"user":true}')


def test_an_address_over_4096_bytes_is_rejected():
    [row] = read_ndjson(io.StringIO('{"token":"' + "x" * 5000 + '"}\n'))
    assert isinstance(row, Rejected) and row.reason == "token longer than 4096 bytes"


def test_names_and_formats():
    assert check_name("daily-2026.12:fr") == "daily-2026.12:fr"
    with pytest.raises(AudienceError):
        check_name("a b")
    assert (guess_format("x.ndjson"), guess_format("x.JSONL"), guess_format("x.csv"), guess_format("x")) == (
        "ndjson", "ndjson", "csv", "csv")


@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=12)), max_size=5,
                unique_by=lambda pair: pair[0]))
def test_the_fast_fields_encoder_writes_what_json_dumps_writes(pairs):
    from pushd.jobs.audience import _fields_encoder

    ordered = sorted(pairs)
    names, values = [n for n, _ in ordered], [v for _, v in ordered]
    expected = json.dumps({n: v for n, v in ordered if v}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if names:
        assert _fields_encoder(names)(values) == expected
