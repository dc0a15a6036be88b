"""Loading and calling the user's hooks module (`--hooks dotted.module`).

`authorize(request, topic) -> bool` decides subscriptions and may block (it runs in a task worker);
`on_message(topic, payload) -> payload | None` rewrites or drops a published message once, on the reactor
thread, before fan-out, so it must be quick. docs/hooks.md has a worked example.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from pushd.config import ConfigError

log = Logger()

Authorize = Callable[[Any, str], bool]
OnMessage = Callable[[str, bytes], "bytes | str | None"]


@dataclass(frozen=True)
class Hooks:
    authorize: Authorize | None = None
    on_message: OnMessage | None = None

    def rewrite(self, topic: str, payload: bytes) -> bytes | None:
        """The payload to deliver after `on_message` (as it is without a hook), or None to drop it; a hook that
        raises drops the message and its traceback is logged."""
        if self.on_message is None:
            return payload
        try:
            return apply_on_message(self.on_message, topic, payload)
        except Exception:
            log.failure("on_message hook raised; message on {topic} dropped", topic=topic)
            return None


def load_hooks(dotted: str) -> Hooks:
    """Import `dotted` and pick up its hooks; every problem is a ConfigError naming the setting."""
    if not dotted:
        return Hooks()
    try:
        module = importlib.import_module(dotted)
    except Exception as e:
        raise ConfigError(f"hooks: cannot import {dotted!r}: {type(e).__name__}: {e}") from None
    found = {}
    for name in ("authorize", "on_message"):
        hook = getattr(module, name, None)
        if hook is not None and not callable(hook):
            raise ConfigError(f"hooks: {dotted}.{name} is not callable")
        found[name] = hook
    if not any(found.values()):
        raise ConfigError(f"hooks: {dotted!r} defines neither authorize nor on_message")
    return Hooks(**found)


def apply_on_message(hook: OnMessage, topic: str, payload: bytes) -> bytes | None:
    """The hook's verdict as bytes, or None to drop; str results are UTF-8 encoded."""
    result = hook(topic, payload)
    if result is None:
        return None
    if isinstance(result, str):
        return result.encode("utf-8")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result)
    raise TypeError(f"on_message returned {type(result).__name__}; expected bytes, str or None")
