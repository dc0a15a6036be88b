"""The `pushd` gateway: a job's message to pushd user ids over their live connections, on any node; the rest
through a fallback gateway (FCM, Web Push, APNs, a webhook), so each recipient is reached once, online first.

A batch is one control message on pushd's control channel naming the users; every node delivers to the local
connections of those users and answers, on a reply list only this batch knows, which of them it reached. PUBLISH
says how many nodes heard the order, so the gateway knows how many answers to wait for: a user no node reports
is offline, however many nodes there are, and goes to the fallback. A node that does not answer within
`wait` seconds is taken to have reached nobody: its users may get the message twice, never zero times.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pushd.gateways.base import Gateway, Message, Outcome, Result, Target, render
from pushd.redis.client import reply_text

#: Seconds to wait for every node's answer.
WAIT = 5.0
#: Recipient fields the fallback address is read from, first found wins: the gateway's own name first.
FALLBACK_FIELDS = {"fcm": ("fcm", "token", "device_token"), "apns": ("apns", "token", "device_token"),
                   "webpush": ("webpush", "subscription"), "webhook": ("webhook", "phone", "address")}
ONLINE = Result(Outcome.SENT, "online")


def encode_order(reply: str, users: Sequence[str], payload: bytes) -> bytes:
    """The control message nodes obey (pushd/service.py, `deliver_users`)."""
    header = {"op": "deliver_users", "reply": reply, "users": list(users)}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def payload_of(message: Message, target: Target) -> bytes:
    """What the user's connections receive: the job's notification, rendered for this recipient."""
    r = render(message, target)
    return json.dumps({"job": message.job_id, "title": r.title, "body": r.body, "data": dict(r.data)},
                      separators=(",", ":"), ensure_ascii=False).encode()


def fallback_target(target: Target, gateway: str) -> Target | None:
    """The recipient as the fallback gateway addresses it, from its fields; None if it has no such address."""
    for name in FALLBACK_FIELDS.get(gateway, ()):
        value = target.fields.get(name)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        if isinstance(value, str) and value:
            return Target(value, target.fields, target.key)
    return None


class PushdGateway:
    name = "pushd"
    log = Logger()

    def __init__(self, reactor: Any, link: Any, blocking_link: Any, *, prefix: str,
                 fallbacks: Callable[[], Mapping[str, Gateway]], wait: float = WAIT) -> None:
        self._reactor = reactor
        self._link = link
        self._blocking = blocking_link
        self._prefix = prefix
        self._fallbacks = fallbacks
        self._wait = wait
        # One blocking connection: the answers of one batch are read at a time (each takes about a millisecond).
        self._answers = defer.DeferredLock()

    def send(self, message: Message, targets: Sequence[Target]) -> defer.Deferred[Sequence[Result]]:
        return defer.ensureDeferred(self._send(message, targets))

    async def _send(self, message: Message, targets: Sequence[Target]) -> Sequence[Result]:
        try:
            online = await self._deliver(message, targets)
        except Exception as e:
            self.log.warn("pushd gateway: {error!r}", error=e)
            # The order may or may not have gone out: nobody is taken for offline (no double send), all retried.
            return [Result(Outcome.RETRY, "redis")] * len(targets)
        results: list[Result | None] = [ONLINE if t.address in online else None for t in targets]
        offline = [i for i, r in enumerate(results) if r is None]
        if offline:
            for i, result in zip(offline, await self._fall_back(message, [targets[i] for i in offline]), strict=True):
                results[i] = result
        return [r if r is not None else Result(Outcome.FAILED, "offline") for r in results]

    async def _deliver(self, message: Message, targets: Sequence[Target]) -> set[str]:
        """The users some node delivered to."""
        groups: dict[bytes, list[str]] = defaultdict(list)
        for target in targets:
            groups[payload_of(message, target)].append(target.address)
        reply = f"{self._prefix}job-reply:{message.job_id}:{os.urandom(8).hex()}"
        nodes = 0
        for payload, users in groups.items():
            nodes += int(await self._link.call("publish", f"{self._prefix}control", encode_order(reply, users, payload)))
        reached: set[str] = set()
        if nodes == 0:
            return reached
        await self._answers.acquire()
        try:
            deadline = time.monotonic() + self._wait
            for _ in range(nodes):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                answer = await self._blocking.call("execute_command", "BLPOP", reply, f"{left:.3f}",
                                                   timeout=left + 5)
                if not answer:
                    break
                reached.update(json.loads(reply_text(answer[1])).get("users", ()))
        finally:
            self._answers.release()
            self._link.call("delete", reply).addErrback(lambda _: None)
        return reached

    async def _fall_back(self, message: Message, targets: Sequence[Target]) -> Sequence[Result]:
        if not message.fallback:
            return [Result(Outcome.FAILED, "offline")] * len(targets)
        gateway = self._fallbacks().get(message.fallback)
        if gateway is None:
            return [Result(Outcome.RETRY, f"no-{message.fallback}-here")] * len(targets)
        addressed = [(i, fallback_target(t, message.fallback)) for i, t in enumerate(targets)]
        results: list[Result] = [Result(Outcome.FAILED, f"offline, no {message.fallback} address")] * len(targets)
        sendable = [(i, t) for i, t in addressed if t is not None]
        if sendable:
            sent = await gateway.send(message, [t for _, t in sendable])
            for (i, _), result in zip(sendable, sent, strict=True):
                if result.outcome is Outcome.SENT:
                    result = Result(Outcome.SENT, message.fallback)
                elif result.outcome is Outcome.INVALID:
                    # The fallback token is dead, not the pushd user: never remove the user from the audience.
                    result = Result(Outcome.FAILED, result.reason)
                results[i] = result
        return results

    def close(self) -> defer.Deferred[None]:
        self._blocking.disconnect()
        return defer.succeed(None)
