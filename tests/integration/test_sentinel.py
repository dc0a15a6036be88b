"""`--redis sentinel://...`: pushd follows the master that Redis Sentinel names, through a failover."""

from __future__ import annotations

import json

from tests.integration.pushd_process import PushdProcess, eventually, publish_until_delivered
from tests.redis_server import RedisServer, SentinelServer


def test_delivery_follows_the_master_through_a_sentinel_failover(tmp_path, redis_binary):
    with RedisServer(redis_binary) as master, RedisServer(redis_binary) as replica:
        replica.client().execute_command("REPLICAOF", "127.0.0.1", master.port)
        eventually(lambda: replica.client().info("replication")["master_link_status"] == "up")
        with SentinelServer(master.port, binary=redis_binary) as sentinel:
            eventually(lambda: len(sentinel.client().execute_command("SENTINEL", "replicas", "mymaster")) == 1)
            url = f"sentinel://127.0.0.1:{sentinel.port}/mymaster"
            with PushdProcess(tmp_path, redis=url, node_id="s1") as node:
                client = node.client()
                client.subscribe("AAPL")
                master.client().publish("push:AAPL", '{"n":1}')
                assert client.recv() == {"topic": "AAPL", "data": {"n": 1}}

                master.kill()
                eventually(lambda: sentinel.master()[1] == replica.port, timeout=30)
                new_master = replica.client()

                assert publish_until_delivered(client, new_master, "AAPL", '{"n":2}', timeout=30) == {
                    "topic": "AAPL", "data": {"n": 2}}
                eventually(lambda: new_master.exists("pushd:heartbeat:s1") and new_master.smembers(
                    "pushd:topic:AAPL") == {f"s1:{json.loads(new_master.get('pushd:heartbeat:s1'))['incarnation']}.1"},
                    timeout=15)
