"""A worked example of a pushd hooks module: `twistd -n pushd --hooks pushd_hooks_example`.

(Put this directory on PYTHONPATH, or copy the file next to your application code.)

- `authorize` runs in a task worker thread, so it may block (a database or an HTTP call to your backend).
  Here: topics under `user.<id>` are private to the client that sent `?user=<id>` on the WebSocket URL;
  `admin.*` is refused to everyone; anything else is public.
- `on_message` runs once per published message on the reactor thread, before the fan-out, so keep it quick.
  Here: a message whose JSON object has `"internal": true` is dropped, and price updates get a `"ts"` field.
"""

import json
import time


def authorize(request, topic):
    """True to allow `topic` for the connection that made `request` (an Autobahn ConnectionRequest)."""
    if topic.startswith("admin."):
        return False
    if topic.startswith("user."):
        owner = topic.split(".", 1)[1]
        return request.params.get("user", [None])[0] == owner
    return True


def on_message(topic, payload):
    """The payload to deliver (bytes or str), or None to drop the message."""
    try:
        message = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(message, dict):
        return payload
    if message.get("internal") is True:
        return None
    if "price" in message:
        message["ts"] = round(time.time(), 3)
        return json.dumps(message, separators=(",", ":"))
    return payload
