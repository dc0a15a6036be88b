"""Audiences: named sets of recipients in Redis, imported from CSV or NDJSON files of any size.

A recipient is a gateway address (a device token, a phone number, a Web Push subscription, a pushd user id) and
optional fields for templating. An audience is one Redis hash, address -> JSON of the fields, so importing
again adds the new recipients and updates the known ones (a user list that grows every day), and a recipient
is there once however often a file names it. Files are read row by row and written in pipelined chunks: memory
stays flat whatever the file's size. A bad row is counted and written, with its line number and why, to a
rejects file; it never stops the import. docs/jobs.md has the formats.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _quote
from typing import IO, Any, NamedTuple

from twisted.internet import defer

#: The column (CSV) or field (NDJSON) that holds the address, when none is named: the first one present.
ADDRESS_NAMES = ("address", "token", "device_token", "phone", "user", "user_id", "subscription")
#: Rows written to Redis per command, and commands in flight at once.
CHUNK = 1000
WINDOW = 8
#: Longer addresses are refused (a Web Push subscription is about 400 bytes, an APNs token 64).
MAX_ADDRESS = 4096
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


#: HSET the [address, fields, ...] JSON array of ARGV[1] into KEYS[1]; how many were new.
ADD_SCRIPT = """
local pairs = cjson.decode(ARGV[1])
local added = 0
for i = 1, #pairs, 2000 do
  added = added + redis.call('HSET', KEYS[1], unpack(pairs, i, math.min(i + 1999, #pairs)))
end
return added
"""
#: HDEL the addresses of the JSON array ARGV[1] from KEYS[1]; how many were there.
REMOVE_SCRIPT = """
local addresses = cjson.decode(ARGV[1])
local removed = 0
for i = 1, #addresses, 2000 do
  removed = removed + redis.call('HDEL', KEYS[1], unpack(addresses, i, math.min(i + 1999, #addresses)))
end
return removed
"""


class AudienceError(Exception):
    """A one-line reason an audience command cannot run at all (bad name, unreadable file, no address column)."""


class Recipient(NamedTuple):
    # A tuple, not a dataclass: millions are made per import, and a tuple is the cheapest value to build.
    address: str
    #: The recipient's other fields as compact JSON ("{}" when none).
    fields: str


class Rejected(NamedTuple):
    line: int
    reason: str
    text: str


def audience_key(prefix: str, name: str) -> str:
    return f"{prefix}audience:{name}"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise AudienceError(f"audience name {name[:64]!r}: use 1 to 128 of A-Z a-z 0-9 _ . : -")
    return name


def _address(value: Any) -> str | None:
    """A usable address from a column or field value; objects (Web Push subscriptions) as canonical JSON."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value).strip()
        return text or None
    return None


def _recipient(line: int, text: str, row: dict[str, Any], column: str) -> Recipient | Rejected:
    address = _address(row.get(column))
    if address is None:
        return Rejected(line, f"no {column}", text)
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        return Rejected(line, f"{column} longer than {MAX_ADDRESS} bytes", text[:200])
    rest = {k: v for k, v in row.items() if k != column and v not in (None, "")}
    return Recipient(address, json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def _fields_encoder(names: list[str]) -> Callable[[list[str]], str]:
    """A function of a row's values giving `json.dumps(dict(zip(names, values)), sort_keys=True, ...)` without the
    empty ones, for string values and `names` already sorted, built from the C string encoder: the hot loop of a
    CSV import."""
    prefixes = [_quote(name) + ":" for name in names]
    if len(prefixes) == 1:
        only = prefixes[0]
        return lambda values: "{" + only + _quote(values[0]) + "}" if values[0] else "{}"

    def encode(values: list[str]) -> str:
        parts = [p + _quote(v) for p, v in zip(prefixes, values, strict=True) if v]
        return "{" + ",".join(parts) + "}" if parts else "{}"

    return encode


def recipient_of(number: int, row: dict[str, Any], column: str = "address") -> Recipient | Rejected:
    """One recipient from an object (the API's inline recipients), checked as a file's row is."""
    return _recipient(number, json.dumps(row, ensure_ascii=False)[:200], row, column)


def read_ndjson(lines: Iterable[str], column: str | None = None) -> Iterator[Recipient | Rejected]:
    """One JSON object per line; blank lines are skipped."""
    for number, text in enumerate(lines, start=1):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            yield Rejected(number, f"not JSON: {e}", text[:200])
            continue
        if not isinstance(row, dict):
            yield Rejected(number, "not a JSON object", text[:200])
            continue
        name = column or next((n for n in ADDRESS_NAMES if n in row), ADDRESS_NAMES[0])
        yield _recipient(number, text, row, name)


def read_csv(lines: Iterable[str], column: str | None = None) -> Iterator[Recipient | Rejected]:
    """A header row, then one recipient per row."""
    reader = csv.reader(lines)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        return
    except csv.Error as e:
        raise AudienceError(f"the header row is not CSV: {e}") from None
    name = column or next((n for n in ADDRESS_NAMES if n in header), None)
    if name is None or name not in header:
        raise AudienceError(f"no address column: name one with --address (the header has {', '.join(header)[:200]})"
                            if column is None else f"no column {column!r} in the header")
    width = len(header)
    at = header.index(name)
    # The other columns in sorted order, for the fields' canonical JSON.
    others = sorted((n, i) for i, n in enumerate(header) if i != at)
    encode = _fields_encoder([n for n, _ in others])
    other_at = [i for _, i in others]
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Rejected(reader.line_num, f"not CSV: {e}", "")
            continue
        if len(values) != width:
            if any(v.strip() for v in values):
                yield Rejected(reader.line_num, f"{len(values)} columns where the header has {width}",
                               ",".join(values)[:200])
            continue
        address = values[at].strip()
        if not address:
            if any(v.strip() for v in values):
                yield Rejected(reader.line_num, f"no {name}", ",".join(values)[:200])
            continue
        if len(address) * 4 > MAX_ADDRESS and len(address.encode("utf-8")) > MAX_ADDRESS:
            yield Rejected(reader.line_num, f"{name} longer than {MAX_ADDRESS} bytes", ",".join(values)[:200])
            continue
        yield Recipient(address, encode([values[i] for i in other_at]) if other_at else "{}")


def read_file(stream: IO[str], file_format: str, column: str | None = None) -> Iterator[Recipient | Rejected]:
    if file_format == "csv":
        return read_csv(stream, column)
    if file_format == "ndjson":
        return read_ndjson(stream, column)
    raise AudienceError(f"format {file_format!r}: csv or ndjson")


def guess_format(path: str) -> str:
    return "ndjson" if path.lower().endswith((".ndjson", ".jsonl", ".json")) else "csv"


@dataclass
class Report:
    """What an import or a removal did."""

    rows: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    rejected: int = 0
    size: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def text(self, verb: str, name: str) -> str:
        parts = [f"{self.rows:,} rows"]
        if verb == "import":
            parts += [f"{self.added:,} added", f"{self.updated:,} already there (updated)"]
        else:
            parts += [f"{self.removed:,} removed"]
        parts.append(f"{self.rejected:,} rejected")
        return f"audience {name}: " + ", ".join(parts) + f"; {self.size:,} recipients now"


class Audiences:
    """Imports into, removes from and reads audiences in Redis through `link` (`RedisLink.call`)."""

    def __init__(self, link: Any, prefix: str, *, chunk: int = CHUNK, window: int = WINDOW) -> None:
        self._link = link
        self._prefix = prefix
        self._chunk = chunk
        self._window = window

    @defer.inlineCallbacks
    def load(self, name: str, rows: Iterable[Recipient | Rejected], rejected: Callable[[Rejected], None],
             *, remove: bool = False) -> Any:
        """Add (or with `remove`, take out) every recipient of `rows`; bad rows go to `rejected`."""
        key = audience_key(self._prefix, check_name(name))
        report = Report()
        pending: list[defer.Deferred[Any]] = []
        chunk: dict[str, str] = {}
        for row in rows:
            report.rows += 1
            if isinstance(row, Rejected):
                report.rejected += 1
                report.reasons[row.reason] = report.reasons.get(row.reason, 0) + 1
                rejected(row)
                continue
            if row.address in chunk:
                report.updated += 1  # named twice close together: one recipient, the later fields win
            chunk[row.address] = row.fields
            if len(chunk) >= self._chunk:
                pending.append(self._write(key, chunk, remove, report))
                chunk = {}
                if len(pending) >= self._window:
                    yield pending.pop(0)
        if chunk:
            pending.append(self._write(key, chunk, remove, report))
        while pending:
            yield pending.pop(0)
        yield self._link.call("sadd", f"{self._prefix}audiences", name)
        report.size = int((yield self._link.call("hlen", key)))
        return report

    def _write(self, key: str, chunk: dict[str, str], remove: bool, report: Report) -> defer.Deferred[Any]:
        # One JSON argument, split by the script: a command of 2,000 arguments costs the client more to encode
        # (txredisapi encodes each) than Redis to decode one string with cjson on its own core.
        if remove:
            d: defer.Deferred[Any] = self._link.call("eval", REMOVE_SCRIPT, [key], [json.dumps(list(chunk))])

            def removed(count: Any) -> None:
                report.removed += int(count)

            return d.addCallback(removed)
        pairs = [item for address_fields in chunk.items() for item in address_fields]
        d = self._link.call("eval", ADD_SCRIPT, [key], [json.dumps(pairs, ensure_ascii=False)])

        def written(new: Any) -> None:
            report.added += int(new)
            report.updated += len(chunk) - int(new)

        return d.addCallback(written)

    @defer.inlineCallbacks
    def show(self, name: str, sample: int = 5) -> Any:
        """The audience's size and a few of its recipients."""
        key = audience_key(self._prefix, check_name(name))
        size = int((yield self._link.call("hlen", key)))
        _, flat = yield self._link.call("execute_command", "HSCAN", key, "0", "COUNT", str(sample))
        flat = list(flat)
        some = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)][:sample]
        return size, some
