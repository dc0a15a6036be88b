"""Centrifugo's server API client, the `cent` package, publishing to a real node through /api/centrifugo
(pushd/api_centrifugo.py): a backend written for Centrifugo changes only its URL."""

from __future__ import annotations

import pytest
from cent import BroadcastRequest, ChannelsRequest, Client, DisconnectRequest, PublishRequest
from cent.exceptions import CentApiResponseError, CentUnauthorizedError
from websockets.exceptions import ConnectionClosed

from tests.integration.pushd_process import PushdProcess

KEY = "an-api-key-for-the-cent-tests"


def test_cent_publishes_broadcasts_lists_channels_and_disconnects(tmp_path, redis_server):
    with PushdProcess(tmp_path, "--api-key", KEY, redis=redis_server.url) as node:
        cent = Client(f"{node.api_url}/api/centrifugo", KEY, timeout=10)
        live = node.client()
        live.subscribe("orders.7", "orders.8")

        first = cent.publish(PublishRequest(channel="orders.7", data={"status": "paid"}))
        received = live.recv()
        assert (received["data"], received["epoch"]) == ({"status": "paid"}, first.epoch)
        assert first.offset == 1 and first.epoch
        assert cent.publish(PublishRequest(channel="orders.7", data=2)).offset == 2

        both = cent.broadcast(BroadcastRequest(channels=["orders.7", "orders.8"], data="shipped"))
        assert [(r.error, r.result.offset) for r in both.responses] == [(None, 3), (None, 1)]
        assert [live.recv()["data"] for _ in range(3)] == [2, "shipped", "shipped"]

        assert {name: info.num_clients for name, info in cent.channels(ChannelsRequest()).channels.items()} == {
            "orders.7": 1, "orders.8": 1}

        with pytest.raises(CentApiResponseError) as refused:
            cent.publish(PublishRequest(channel="orders 7", data=1))
        assert refused.value.code == 102

        with pytest.raises(CentUnauthorizedError):
            Client(f"{node.api_url}/api/centrifugo", "wrong", timeout=10).publish(
                PublishRequest(channel="orders.7", data=1))

        [conn_id] = redis_server.client().smembers("pushd:topic:orders.7")
        cent.disconnect(DisconnectRequest(user="anyone", client=conn_id))
        with pytest.raises(ConnectionClosed) as closed:
            live.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
