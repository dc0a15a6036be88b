"""The `pushctl` command: `pushctl stats` and `pushctl publish TOPIC JSON`, talking to the server's own Redis.

With no Redis configured, the running server's Redis is found through the runtime file it writes beside its
pidfile, so `twistd -n pushd` in one terminal and `pushctl publish AAPL '{"price":1}'` in another just work.
The command is not called `pushd` because bash and zsh have a `pushd` builtin that a program of that name can
never override; `python -m pushd` runs the same commands.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from twisted.internet import defer, task
from twisted.python import usage

from pushd import __version__, protocol
from pushd.config import ConfigError, Options, build_config
from pushd.jobs import commands, model
from pushd.jobs.audience import AudienceError, Audiences, Rejected, check_name, guess_format, read_file
from pushd.jobs.store import JobConflict, JobNotFound, JobStore
from pushd.redis.client import RedisLink, reply_text
from pushd.redis.history import History, HistoryKeys, HistoryPolicies
from pushd.redis.state import Keys
from pushd.redis.target import RedisTarget, parse_redis_url
from pushd.service import runtime_dir

#: The name the messages use: the console script's, also when run as `python -m pushd`.
COMMAND = "pushctl"


class CommandError(Exception):
    """A one-line error for the user; exit status 1."""


def _print_version(self: usage.Options) -> None:
    """Print pushd's version and exit."""
    sys.stdout.write(f"{COMMAND} (pushd) {__version__}\n")
    sys.exit(0)


class _Common(usage.Options):
    opt_version = _print_version
    longdesc = ""
    optParameters = [
        ["config", "c", None, "INI file with a [pushd] section, as given to twistd pushd --config."],
        ["redis", None, None, "Redis URL; overrides the config file and the running server's runtime file."],
        ["pidfile", None, "twistd.pid", "The server's pidfile; its runtime file is looked for beside it."],
    ]


class PublishOptions(_Common):
    synopsis = "[options] TOPIC DATA"
    optFlags = [
        ["raw", None, "Send DATA as it is, even if it is not JSON (subscribers get a JSON string)."],
        ["plain", None, "A plain PUBLISH: no history, no offset (the low-latency path publishers use)."],
    ]

    def parseArgs(self, topic: str, data: str) -> None:  # type: ignore[override]
        self["topic"] = topic
        self["data"] = data


class StatsOptions(_Common):
    optParameters: list[list[Any]] = [["top", None, 20, "Show the N topics with the most subscribers.", int]]
    optFlags = [["json", None, "Print JSON instead of a table."]]


class _AudienceFile(_Common):
    synopsis = "[options] NAME FILE"
    optParameters = [
        ["format", None, None, "csv or ndjson (default: by the file's extension; .ndjson/.jsonl/.json are NDJSON)."],
        ["address", None, None, ("The column or field holding the address (default: the first of "
                                 "address, token, device_token, phone, user, user_id, subscription).")],
        ["rejects", None, None, "Where the rejected rows are written (default: FILE.rejected)."],
    ]

    def parseArgs(self, name: str, path: str) -> None:  # type: ignore[override]
        self["name"] = name
        self["path"] = path


class _AudienceName(_Common):
    synopsis = "[options] NAME"

    def parseArgs(self, name: str) -> None:  # type: ignore[override]
        self["name"] = name


class AudienceOptions(usage.Options):
    subCommands = [
        ["import", None, _AudienceFile, "Add (or update) the recipients of FILE to audience NAME."],
        ["remove", None, _AudienceFile, "Remove the recipients of FILE from audience NAME."],
        ["show", None, _AudienceName, "How many recipients audience NAME has, and a few of them."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name an audience command: import, remove or show")


class JobCreateOptions(_Common):
    synopsis = "[options] (--audience NAME | --recipients FILE) --gateway GATEWAY --title TITLE"
    optParameters = [
        ["audience", None, None, "The audience to send to (pushctl audience import)."],
        ["recipients", None, None, "A CSV or NDJSON file of recipients for this job alone, instead of --audience."],
        ["format", None, None, "--recipients: csv or ndjson (default: by the file's extension)."],
        ["address", None, None, "--recipients: the column or field holding the address."],
        ["rejects", None, None, "--recipients: where rejected rows go (default: FILE.rejected)."],
        ["gateway", None, None, "webhook, fcm, webpush, apns or pushd."],
        ["title", None, None, "The title; $field is replaced by the recipient's field."],
        ["body", None, None, "The body; $field as in the title."],
        ["batch", None, None, "Recipients per batch [default: 500]."],
        ["rate", None, None, "Most recipients per second across all workers: N/s, N/min or N/h."],
        ["test-to", None, None, "Send to this address first and wait for pushctl job confirm."],
        ["start-at", None, None, "When to start: ISO 8601 (UTC without a zone), unix seconds, or +N[s|m|h]."],
        ["key", None, None, "Idempotency key: the same key within 24 hours returns the first job."],
        ["fallback", None, None, "pushd gateway: where users with no live connection go (fcm, webpush, apns, webhook)."],
        ["ttl", None, None, "Seconds a provider may keep the message for an offline device [default: 86400]."],
        ["retries", None, None, "Transient failures one recipient may have [default: 5]."],
    ]
    optFlags = [["json", None, "Print the answer as JSON."]]

    def __init__(self) -> None:
        super().__init__()
        self["data"] = {}

    def opt_data(self, pair: str) -> None:
        """NAME=VALUE for the message's data; repeatable."""
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise usage.UsageError(f"--data {pair!r}: expected NAME=VALUE")
        self["data"][name] = value

    def postOptions(self) -> None:
        if bool(self["audience"]) == bool(self["recipients"]):
            raise usage.UsageError("give --audience NAME or --recipients FILE (one of them)")

    def spec_fields(self) -> dict[str, Any]:
        names = ("audience", "gateway", "title", "body", "batch", "rate", "test-to", "start-at", "key", "fallback",
                 "ttl", "retries")
        fields: dict[str, Any] = {name.replace("-", "_"): self[name] for name in names if self[name] is not None}
        fields["data"] = self["data"]
        return fields


class _JobId(_Common):
    synopsis = "[options] JOB-ID"
    optFlags = [["json", None, "Print JSON."]]

    def parseArgs(self, job_id: str) -> None:  # type: ignore[override]
        self["id"] = job_id


class JobShowOptions(_JobId):
    optParameters = [["failures", None, None, "Write every permanent failure to this file (NDJSON)."]]


class JobListOptions(_Common):
    optParameters: list[list[Any]] = [["limit", None, 50, "Show the newest N jobs.", int]]
    optFlags = [["json", None, "Print JSON."]]


class JobOptions(usage.Options):
    subCommands = [
        ["create", None, JobCreateOptions, "Create a push job."],
        ["list", None, JobListOptions, "The newest jobs and their progress."],
        ["show", None, JobShowOptions, "A job's report: counts, duration, errors; --failures FILE."],
        ["watch", None, _JobId, "A live progress bar until the job is finished."],
        ["confirm", None, _JobId, "Run a job waiting after its test message."],
        ["pause", None, _JobId, "Stop workers from taking the job's batches."],
        ["resume", None, _JobId, "Go on with a paused job."],
        ["cancel", None, _JobId, "Stop a job for good."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a job command: create, list, show, watch, confirm, pause, resume, cancel")


class WorkerOptions(Options):
    """`pushctl worker`: every setting of `twistd pushd`; the same as `twistd -n pushd-worker`."""

    optParameters = Options.optParameters + [
        ["pidfile", None, "twistd.pid", "A running node's pidfile: its Redis is used when --redis is not given."],
    ]


class CommandOptions(usage.Options):
    opt_version = _print_version
    longdesc = ("Reads and publishes through the Redis of a running pushd node (twistd pushd). "
                "`python -m pushd` is the same command.")
    subCommands = [
        ["publish", None, PublishOptions, "Publish DATA (JSON) to TOPIC through the server's Redis."],
        ["stats", None, StatsOptions, "Nodes, connections, topics and subscribers, read from Redis."],
        ["audience", None, AudienceOptions, "Recipient lists for push jobs: import, remove, show."],
        ["job", None, JobOptions, "Push jobs: create, list, show, watch, confirm, pause, resume, cancel."],
        ["worker", None, WorkerOptions, "Run job workers in the foreground (as twistd -n pushd-worker)."],
    ]

    def getSynopsis(self) -> str:
        # A command's own usage line reads "Usage: pushctl publish [options] TOPIC DATA".
        return f"Usage: {COMMAND}" if self.subCommand else f"Usage: {COMMAND} COMMAND [options]"

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: publish, stats, audience, job or worker")


@dataclass(frozen=True)
class Server:
    target: RedisTarget
    keys: Keys
    channel_prefix: str
    redis_timeout: int
    history: HistoryPolicies


def locate_server(options: usage.Options) -> Server:
    """Where the server's Redis is: --redis, else the config file, else the running server's runtime file."""
    try:
        config = build_config({"redis": options["redis"]}, options["config"])
        history = HistoryPolicies.parse(config.history_size, config.history_ttl, config.history_rules)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    except ValueError as e:
        raise CommandError(f"history-rules: {e}") from None
    if config.redis is not None:
        return Server(config.redis, Keys(config.key_prefix), config.channel_prefix, config.redis_timeout, history)
    path = os.path.join(runtime_dir(options["pidfile"]), "pushd.runtime.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        os.kill(int(info["pid"]), 0)
        target = parse_redis_url(info["redis"])
        if "history" in info:
            history = HistoryPolicies.parse(*info["history"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CommandError(
            f"no pushd server is running here (no live runtime file at {path}); start one with "
            f"`twistd -n pushd`, or pass --pidfile of a running server or --redis URL") from None
    return Server(target, Keys(info.get("key_prefix", config.key_prefix)),
                  info.get("channel_prefix", config.channel_prefix), config.redis_timeout, history)


def publish_payload(data: str, raw: bool) -> bytes:
    if not raw:
        try:
            json.loads(data)
        except ValueError as e:
            raise CommandError(f"DATA is not valid JSON ({e}); quote it for your shell or pass --raw") from None
    return data.encode("utf-8")


@defer.inlineCallbacks
def publish(reactor: Any, server: Server, topic: str, payload: bytes, plain: bool = False) -> Any:
    """Publish as the HTTP API does (history and an offset, per the server's history settings), or plainly."""
    problem = protocol.topic_error(topic, protocol.Limits())
    if problem is not None:
        raise CommandError(problem)
    link = RedisLink(reactor, server.target, timeout=server.redis_timeout)
    try:
        if plain:
            nodes = yield link.call("publish", server.channel_prefix + topic, payload)
            return f"published to {topic}: {int(nodes)} node(s) listening"
        history = History(link, HistoryKeys(server.keys.prefix), server.history,
                          channel_prefix=server.channel_prefix)
        [position] = yield history.publish([(topic, payload)])
    finally:
        yield link.disconnect()
    if position is None:
        return f"published to {topic} (no history kept for it)"
    return f"published to {topic} at offset {position.offset} (epoch {position.epoch})"


@defer.inlineCallbacks
def read_stats(reactor: Any, server: Server) -> Any:
    link = RedisLink(reactor, server.target, timeout=server.redis_timeout)
    keys = server.keys
    try:
        nodes = []
        for node in sorted((yield link.call("smembers", keys.nodes))):
            heartbeat = yield link.call("get", keys.heartbeat(node))
            connections = yield link.call("scard", keys.node(node))
            info = json.loads(heartbeat) if heartbeat else {}
            nodes.append({"node": node, "alive": heartbeat is not None, "connections": int(connections),
                          "pid": info.get("pid"), "urls": info.get("urls", []), "dropped": info.get("pruned", {})})
        topics = {}
        for topic in (yield link.call("smembers", keys.topics)):
            topics[topic] = int((yield link.call("scard", keys.topic(topic))))
    finally:
        yield link.disconnect()
    return {"nodes": nodes, "connections": sum(n["connections"] for n in nodes), "topics": topics}


def format_stats(stats: dict[str, Any], top: int) -> str:
    lines = [(f"nodes: {len(stats['nodes'])}   connections: {stats['connections']}   "
             f"topics: {len(stats['topics'])}   subscriptions: {sum(stats['topics'].values())}"), ""]
    lines.append(f"{'NODE':<32} {'STATE':<6} {'CONNECTIONS':>11} {'DROPPED':>8}  URLS")
    for node in stats["nodes"]:
        state = "alive" if node["alive"] else "dead"
        dropped = sum(node["dropped"].values())
        lines.append(f"{node['node']:<32} {state:<6} {node['connections']:>11} {dropped:>8}  {' '.join(node['urls'])}")
    ranked = sorted(stats["topics"].items(), key=lambda item: (-item[1], item[0]))
    lines += ["", f"{'TOPIC':<32} {'SUBSCRIBERS':>11}"]
    lines += [f"{topic:<32} {count:>11}" for topic, count in ranked[:top]]
    if len(ranked) > top:
        lines.append(f"... and {len(ranked) - top} more topics (--top N)")
    return "\n".join(lines)


@defer.inlineCallbacks
def audience(reactor: Any, server: Server, command: str, options: usage.Options) -> Any:
    """`pushctl audience import|remove|show`: one line (or a few) for the user."""
    link = RedisLink(reactor, server.target, timeout=server.redis_timeout)
    audiences = Audiences(link, server.keys.prefix)
    try:
        check_name(options["name"])
        if command == "show":
            size, some = yield audiences.show(options["name"])
            lines = [f"audience {options['name']}: {size:,} recipients"]
            lines += [f"  {reply_text(address)}  {reply_text(fields)}" for address, fields in some]
            return "\n".join(lines)
        path = options["path"]
        rejects_path = options["rejects"] or path + ".rejected"
        try:
            with open(path, encoding="utf-8", newline="") as stream, _Rejects(rejects_path) as rejects:
                rows = read_file(stream, options["format"] or guess_format(path), options["address"])
                report = yield audiences.load(options["name"], rows, rejects.write, remove=command == "remove")
        except OSError as e:
            raise CommandError(f"{e.filename}: {e.strerror}") from None
    except AudienceError as e:
        raise CommandError(str(e)) from None
    finally:
        yield link.disconnect()
    text = report.text(command, options["name"])
    if report.rejected:
        text += f"\nrejected rows written to {rejects_path}: " + ", ".join(
            f"{count:,} {reason}" for reason, count in sorted(report.reasons.items(), key=lambda r: -r[1])[:5])
    return text


class _Rejects:
    """The rejects file, created only when a row is rejected (an old one is removed first)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def write(self, row: Rejected) -> None:
        if self._file is None:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)
        self._file.write(json.dumps({"line": row.line, "reason": row.reason, "row": row.text},
                                    ensure_ascii=False) + "\n")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


@defer.inlineCallbacks
def job(reactor: Any, server: Server, command: str, options: Any) -> Any:
    """`pushctl job ...`: the text to print."""
    link = RedisLink(reactor, server.target, timeout=server.redis_timeout)
    prefix = server.keys.prefix
    store = JobStore(link, prefix)
    try:
        if command == "create":
            path = options["recipients"]
            if path:
                rejects_path = options["rejects"] or path + ".rejected"
                try:
                    with open(path, encoding="utf-8", newline="") as stream, _Rejects(rejects_path) as rejects:
                        rows = read_file(stream, options["format"] or guess_format(path), options["address"])
                        job_id, created, state = yield store.submit(options.spec_fields(), rows, rejects.write)
                except OSError as e:
                    raise CommandError(f"{e.filename}: {e.strerror}") from None
            else:
                job_id, created, state = yield store.submit(options.spec_fields())
            if options["json"]:
                return json.dumps({"id": job_id, "state": state, "duplicate": not created})
            return job_id if created else f"{job_id} (the job key {options['key']!r} already named; nothing new)"
        if command == "list":
            reports = yield store.list(options["limit"])
            if options["json"]:
                return json.dumps({"jobs": reports}, indent=2)
            return "\n".join(commands.list_line(r) for r in reports) or "no jobs"
        job_id = options["id"]
        if command == "show":
            report = yield store.show(job_id)
            text = json.dumps(report, indent=2) if options["json"] else commands.format_report(report)
            if options["failures"]:
                count = yield commands.write_failures(store, job_id, options["failures"])
                text += f"\n{count:,} failures written to {options['failures']}"
            return text
        if command == "watch":
            watch = commands.Watch(reactor, link, prefix, job_id)
            reactor.addSystemEventTrigger("before", "shutdown", watch.stop)
            report = yield watch.start()
            return commands.format_report(report)
        state = yield store.transition(job_id, command)
        return f"job {job_id}: {state}"
    except (model.JobError, JobConflict, AudienceError) as e:
        raise CommandError(str(e)) from None
    except JobNotFound:
        raise CommandError(f"no job {options['id']!r}") from None
    finally:
        yield link.disconnect()


def worker(reactor: Any, options: WorkerOptions) -> defer.Deferred[None]:
    """`pushctl worker`: job workers until SIGINT/SIGTERM; the batches in hand are finished first."""
    from pushd.jobs.process import WorkerProcess, find_redis

    try:
        config = build_config(options.given(), options["config"])
        if config.job_workers == 0:
            raise CommandError("job-workers: 0 here would run nothing; a worker process needs at least 1")
        config = find_redis(config, os.path.join(runtime_dir(options["pidfile"]), "pushd.runtime.json"))
    except ConfigError as e:
        raise CommandError(str(e)) from None
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # The log as twistd -n writes it: to stdout, one line per event.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],  # type: ignore[list-item]
                                     redirectStandardIO=False)
    process = WorkerProcess(reactor, config, stop_reactor=False)
    stopped: defer.Deferred[None] = defer.Deferred()
    def finish(_: object) -> None:
        if not stopped.called:
            stopped.callback(None)

    reactor.addSystemEventTrigger("before", "shutdown", lambda: process.stopService().addBoth(finish))
    process.startService()
    process.ready.addErrback(lambda f: None if stopped.called else stopped.errback(CommandError(str(f.value))))
    return stopped


def _run(reactor: Any, options: CommandOptions) -> Any:
    sub = options.subOptions
    if options.subCommand == "worker":
        return worker(reactor, sub)
    if options.subCommand == "job":
        command, sub = sub.subCommand, sub.subOptions
        d = job(reactor, locate_server(sub), command, sub)
        d.addCallback(_say)
        return d
    if options.subCommand == "audience":
        command, sub = sub.subCommand, sub.subOptions
        d = audience(reactor, locate_server(sub), command, sub)
        d.addCallback(_say)
        return d
    server = locate_server(sub)
    if options.subCommand == "publish":
        payload = publish_payload(sub["data"], sub["raw"])
        d = publish(reactor, server, sub["topic"], payload, sub["plain"])
        d.addCallback(_say)
        return d
    d = read_stats(reactor, server)
    d.addCallback(lambda stats: _say(json.dumps(stats, indent=2) if sub["json"] else format_stats(stats, sub["top"])))
    return d


def main(argv: Sequence[str] | None = None) -> None:
    options = CommandOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.exit(f"{getattr(options, 'subOptions', options)}\n{COMMAND}: {e}")

    def run(reactor: Any) -> Any:
        return defer.maybeDeferred(_run, reactor, options).addErrback(_fail)

    task.react(run)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _fail(failure: Any) -> None:
    if failure.check(CommandError):
        sys.stderr.write(f"{COMMAND}: {failure.value}\n")
    else:
        sys.stderr.write(f"{COMMAND}: {failure.getErrorMessage()}\n")
    raise SystemExit(1)
