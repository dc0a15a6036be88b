"""A real node and real clients: a page of another site gets 403 on the WebSocket and on the API, a page the node
allows gets in, and a POST without Content-Type gets 415."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.integration.pushd_process import Client, PushdProcess, RequestFirstConnection

APP = "http://127.0.0.1:8000"


def open_ws(node: PushdProcess, origin: str | None) -> Client:
    url = node.url.replace("//localhost:", "//127.0.0.1:")
    return Client(connect(url, origin=origin, ssl=ssl.create_default_context(cafile=node.cert),
                          server_hostname="localhost", open_timeout=10, close_timeout=5,
                          legacy=True, create_connection=RequestFirstConnection))


def post(node: PushdProcess, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """A POST through http.client, which sends no header it was not given (urllib adds a form Content-Type)."""
    api = urllib.parse.urlsplit(node.api_url)
    connection = http.client.HTTPConnection(api.hostname, api.port, timeout=10)
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_pages_of_other_sites_get_403_and_a_post_without_content_type_gets_415(tmp_path, redis_server):
    with PushdProcess(tmp_path, "--allowed-origins", APP, redis=redis_server.url) as node:
        with pytest.raises(InvalidStatus) as refused:
            open_ws(node, "https://evil.example")
        assert refused.value.response.status_code == 403

        subscriber = open_ws(node, APP)  # the page the node allows
        subscriber.subscribe("news")
        assert open_ws(node, None).request({"op": "ping", "id": 1}) == {"op": "pong", "id": 1}  # not a browser

        message = json.dumps({"topic": "news", "data": "from evil"}).encode()
        status, reply = post(node, "/api/publish", message, {"Origin": "https://evil.example",
                                                             "Content-Type": "application/json"})
        assert status == 403 and reply["error"]["code"] == "forbidden"
        status, reply = post(node, "/api/publish", message, {})
        assert status == 415 and reply["error"] == {"code": "unsupported_media_type",
                                                    "message": "a POST needs Content-Type: application/json"}
        request = urllib.request.Request(node.api_url + "/api/publish", data=message, method="POST")
        with pytest.raises(urllib.error.HTTPError) as form:  # urllib's default: a form's Content-Type
            urllib.request.urlopen(request, timeout=10)
        assert form.value.code == 415

        status, _ = post(node, "/api/publish", json.dumps({"topic": "news", "data": "ok"}).encode(),
                         {"Content-Type": "application/json"})
        assert status == 200
        # The first message the subscriber gets is the allowed one: the refused requests sent nothing.
        received = subscriber.recv()
        assert (received["topic"], received["data"]) == ("news", "ok")
