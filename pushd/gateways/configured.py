"""The gateways this process's settings configure: each one whose main setting is given, plus `pushd`.

A gateway module is imported only when configured, so a node that sends nothing through APNs never loads
HTTP/2. A configured gateway with a bad setting stops start-up with the gateway's one-line error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pushd.config import Config
from pushd.gateways.base import Gateway
from pushd.gateways.pushd import PushdGateway
from pushd.tasks import TaskRunner

#: Gateway name -> the setting that turns it on.
MAIN_SETTING = {"webhook": "webhook_url", "fcm": "fcm_credentials", "webpush": "webpush_vapid_key",
                "apns": "apns_key"}


def build_gateways(reactor: Any, config: Config, tasks: TaskRunner, link: Any,
                   blocking_link: Callable[[], Any]) -> dict[str, Gateway]:
    """name -> gateway for every configured gateway; raises ConfigError naming the bad setting."""
    gateways: dict[str, Gateway] = {}
    for name, setting in MAIN_SETTING.items():
        if getattr(config, setting):
            module = importlib.import_module(f"pushd.gateways.{name}")
            gateways[name] = module.build(reactor, config, tasks)
    gateways["pushd"] = PushdGateway(reactor, link, blocking_link(), prefix=config.key_prefix,
                                     fallbacks=lambda: gateways)
    return gateways
