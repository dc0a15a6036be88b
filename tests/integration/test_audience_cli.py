"""`pushctl audience` against a real redis-server: import twice (the daily growth), rejects, show, remove."""

from __future__ import annotations

import csv
import json

from tests.integration.pushd_process import run_cli


def test_import_again_updates_bad_rows_go_to_a_file_and_remove_takes_them_out(tmp_path, redis_server):
    redis = ("--redis", redis_server.url)
    path = tmp_path / "users.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phone", "name"])
        for i in range(2500):  # more than two chunks
            writer.writerow([f"+3361234{i:04d}", f"user{i}"])
        writer.writerow(["", "nobody"])
        writer.writerow(["+33612340001", "renamed"])

    first = run_cli(tmp_path, "audience", "import", *redis, "daily", str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == ("audience daily: 2,502 rows, 2,500 added, 1 already there (updated), "
                                           "1 rejected; 2,500 recipients now")
    [rejected] = [json.loads(line) for line in (tmp_path / "users.csv.rejected").read_text().splitlines()]
    assert rejected == {"line": 2502, "reason": "no phone", "row": ",nobody"}

    r = redis_server.client()
    assert r.hget("pushd:audience:daily", "+33612340001") == '{"name":"renamed"}'
    assert r.smembers("pushd:audiences") == {"daily"}

    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(["+33699999999", "new"])
    again = run_cli(tmp_path, "audience", "import", *redis, "daily", str(path))
    assert "1 added" in again.stdout and "2,501 recipients now" in again.stdout, again.stdout

    shown = run_cli(tmp_path, "audience", "show", *redis, "daily")
    assert shown.stdout.splitlines()[0] == "audience daily: 2,501 recipients"

    removed = run_cli(tmp_path, "audience", "remove", *redis, "daily", str(path))
    assert "2,501 removed" in removed.stdout and "0 recipients now" in removed.stdout, removed.stdout


def test_bad_names_and_missing_files_are_one_line_errors(tmp_path, redis_server):
    redis = ("--redis", redis_server.url)
    bad = run_cli(tmp_path, "audience", "import", *redis, "a b", "x.csv")
    assert bad.returncode == 1 and bad.stderr == "pushctl: audience name 'a b': use 1 to 128 of A-Z a-z 0-9 _ . : -\n"
    missing = run_cli(tmp_path, "audience", "import", *redis, "daily", str(tmp_path / "none.csv"))
    assert missing.returncode == 1 and "none.csv: No such file or directory" in missing.stderr
    (tmp_path / "x.csv").write_text("name\nAda\n")
    no_column = run_cli(tmp_path, "audience", "import", *redis, "daily", str(tmp_path / "x.csv"))
    assert no_column.returncode == 1 and "no address column" in no_column.stderr
