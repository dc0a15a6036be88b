"""What `pushctl job` prints: the report, the list line and the watch line, as pure functions of a job's report."""

from __future__ import annotations

from pushd.jobs import commands, model


def report(**counts):
    spec = model.parse_spec({"gateway": "pushd", "fallback": "fcm", "audience": "daily", "title": "Hi $name",
                             "rate": "100/s"}, now=0)
    raw = {"id": "j1", "state": "running", "spec": spec.to_json(), "expanded": "1", "created": "1800000000",
           "started": "1800000000", **{k: str(v) for k, v in counts.items()}}
    return {**model.progress(raw), "failures": counts.get("failed", 0)}


def test_the_watch_line_has_counts_rate_eta_workers_and_the_top_errors():
    r = report(total=1000, sent=300, failed=50, invalid=50, retrying=7, **{"e:offline": 50, "e:http-503": 9})
    line = commands.watch_line(r, [(10.0, 200), (12.0, 400)], workers=3)
    assert line == ("running: 400/1,000 sent 300 failed 50 invalid 50 retrying 7 remaining 600 rate 100/s "
                    "eta 6 s workers 3 errors offline=50 http-503=9")


def test_the_watch_line_before_expansion_ends_and_without_samples():
    r = report(total=500, sent=10)
    r["expanded"], r["remaining"] = False, None
    assert commands.watch_line(r, [], workers=0).startswith("running: 10/500+ sent 10")
    assert "remaining ? rate ? eta ?" in commands.watch_line(r, [], workers=0)


def test_rate_is_over_the_samples():
    assert commands.rate([]) is None
    assert commands.rate([(1.0, 0)]) is None
    assert commands.rate([(1.0, 0), (3.0, 1000)]) == 500


def test_the_report_says_everything_a_user_asks_after_a_job():
    r = report(total=1000, sent=900, failed=60, invalid=40, removed=40, **{"e:offline": 60, "v:online": 800,
                                                                            "v:fcm": 100})
    r["duration"], r["test"] = 10.0, {"address": "me", "outcome": "sent", "reason": ""}
    text = commands.format_report(r)
    assert text.splitlines() == [
        "job j1: running",
        "  gateway pushd (fallback fcm), audience daily, batch 500, rate 100/s",
        "  title 'Hi $name'",
        "  test to me: sent",
        "  total 1,000: sent 900, failed 60, invalid 40 (removed 40), remaining 0",
        "  retrying 0, retried 0, redelivered 0, duplicates 0",
        "  duration 10.0 s, 90 sent/s",
        "  sent via: fcm 100, online 800",
        "  errors: offline 60",
        "  60 permanent failures recorded (--failures FILE writes them)",
    ]


def test_a_list_line_per_job():
    line = commands.list_line(report(total=10, sent=4))
    assert line.startswith("j1  2027-01-15 08:00:00Z  running               pushd              4/10 done")
