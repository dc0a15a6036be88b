"""Builds the HTTP API's OpenAPI 3.1 document from `pushd.api.ROUTES` and the schemas below, so it cannot drift.

`python -m pushd.openapi` rewrites docs/openapi.json; a test fails when the file is out of date or misses a route,
and `GET /api/openapi.json` serves the same document.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pushd import __version__, api, api_centrifugo, protocol
from pushd.jobs import model as job_model

Schema = dict[str, Any]


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Schema:
    return _ref("schemas", name)


def _object(properties: dict[str, Schema], required: tuple[str, ...] | None = None, **extra: Any) -> Schema:
    return {"type": "object", "properties": properties,
            "required": list(properties if required is None else required), "additionalProperties": False, **extra}


_COUNT: Schema = {"type": "integer", "minimum": 0}
_PER_NODE: Schema = {"type": "object", "additionalProperties": _COUNT}

SCHEMAS: dict[str, Schema] = {
    "Error": _object({"error": _object({
        "code": {"type": "string", "enum": list(api.ErrorCode.ALL)},
        "message": {"type": "string", "description": "What was wrong, naming the field, e.g. "
                                                     "\"messages[3].topic: topic names must not be empty\"."},
    })}),
    "Topic": {"type": "string", "minLength": 1,
              "description": f"A topic name: characters from {protocol.TOPIC_ALPHABET}, at most max-topic-length "
                             "(default 128)."},
    "Data": {"description": "Any JSON value, null included; subscribers receive its compact JSON text."},
    "Message": _object({"topic": _schema("Topic"), "data": _schema("Data")}),
    "PublishBatch": _object({"messages": {"type": "array", "items": _schema("Message"), "minItems": 1,
                                          "description": "At most max_batch messages (default 1000)."}}),
    "PublishRequest": {"oneOf": [_schema("Message"), _schema("PublishBatch")]},
    "Published": _object({
        "topic": _schema("Topic"),
        "offset": {"type": ["string", "null"], "description": "The message's place in the topic's history; "
                                                             "null when the topic keeps no history."},
        "epoch": {"type": ["string", "null"], "description": "The history's epoch; null with offset."},
    }),
    "PublishResult": {"oneOf": [_schema("Published"),
                                _object({"results": {"type": "array", "items": _schema("Published"),
                                                     "description": "One result per message, in order."}})]},
    "UserPublishRequest": _object({"data": _schema("Data")}),
    "UserNodes": _object({"user": {"type": "string"},
                          "nodes": {**_COUNT, "description": "How many nodes the request reached."}}),
    "BroadcastRequest": _object({
        "data": _schema("Data"),
        "key": {"type": ["string", "null"], "minLength": 1, "maxLength": api.MAX_KEY_LENGTH,
                "description": "Deduplication key: a second broadcast with the same key within the dedup window "
                               "is not sent again and answers 200 with the first broadcast's id."},
    }, required=("data",)),
    "BroadcastResult": _object({"id": {"type": "string"},
                                "duplicate": {"type": "boolean",
                                              "description": "true: the key was seen within the dedup window."}}),
    "BroadcastStatus": {"type": "object", "additionalProperties": True,
                        "description": "The broadcast's delivery status, as the cluster reports it."},
    "Topics": _object({"topics": {**_PER_NODE, "description": "Topic name -> subscribers, cluster-wide."}}),
    "TopicSubscribers": _object({
        "topic": _schema("Topic"),
        "nodes": {**_PER_NODE, "description": "Node id -> subscribers of the topic on that node."},
        "subscribers": {**_COUNT, "description": "The sum over the nodes."},
    }),
    "Nodes": _object({"nodes": {"type": "array", "items": {"type": "object", "additionalProperties": True}}}),
    "Disconnected": _object({"disconnected": {"const": True}}),
    "JobRequest": {
        "type": "object", "additionalProperties": False, "required": ["gateway", "title"],
        "description": "A push job (docs/jobs.md). Give audience, or recipients for a job of its own.",
        "properties": {
            "gateway": {"type": "string", "enum": list(job_model.GATEWAYS)},
            "audience": {"type": "string", "description": "An audience imported with pushctl audience import."},
            "recipients": {"type": "array", "minItems": 1, "maxItems": api.MAX_INLINE_RECIPIENTS,
                           "items": {"oneOf": [{"type": "string"},
                                               {"type": "object", "required": ["address"],
                                                "additionalProperties": True}]},
                           "description": "Addresses, or objects with an address and fields for templating."},
            "title": {"type": "string", "description": "$field is replaced by the recipient's field."},
            "body": {"type": "string"},
            "data": {"type": "object", "additionalProperties": {"type": "string"}},
            "batch": {"type": "integer", "minimum": 1, "maximum": job_model.MAX_BATCH, "default": 500},
            "rate": {"type": ["string", "number"], "description": "Recipients per second across every worker: "
                                                                  "N/s, N/min, N/h or a number."},
            "test_to": {"type": "string", "description": "Send here first; the job waits for confirm."},
            "start_at": {"type": ["string", "number"],
                         "description": "ISO 8601 (UTC without a zone), unix seconds, or +N[s|m|h]."},
            "key": {"type": "string", "maxLength": 200,
                    "description": "Idempotency key: the same key within 24 hours answers the first job."},
            "fallback": {"type": "string", "enum": list(job_model.FALLBACKS),
                         "description": "pushd gateway only: where users with no live connection go."},
            "ttl": {"type": "integer", "minimum": 0, "default": 86400},
            "retries": {"type": "integer", "minimum": 0, "maximum": 50, "default": 5},
        },
    },
    "JobCreated": _object({"id": {"type": "string"}, "state": {"type": "string"},
                           "duplicate": {"type": "boolean", "description": "true: the key named an existing job."}}),
    "JobReport": {"type": "object", "additionalProperties": True,
                  "description": "state, spec, total, sent, failed, invalid, removed, remaining, retrying, retried, "
                                 "redelivered, duplicates, cancelled, errors, sent_via, test, failures, created, "
                                 "started, finished, duration (docs/jobs.md)."},
    "Jobs": _object({"jobs": {"type": "array", "items": _schema("JobReport")}}),
    "JobState": _object({"id": {"type": "string"}, "state": {"type": "string"}}),
    "JobFailures": _object({
        "failures": {"type": "array", "items": {"type": "object", "additionalProperties": True,
                                                 "description": "address, outcome, reason, at"}},
        "next": {"type": ["integer", "null"], "description": "start of the next page; null at the end."}}),
    "OpenApiDocument": {"type": "object", "description": "This document."},
    "CentrifugoParams": {"type": "object", "additionalProperties": True,
                         "description": "The method's params as Centrifugo's server API defines them (publish: "
                                        "channel, data; broadcast: channels, data; disconnect: user, client, "
                                        "disconnect; channels: pattern)."},
    "CentrifugoReply": {"type": "object", "additionalProperties": True,
                        "description": "{\"result\": ...} as Centrifugo answers, or {\"error\": {\"code\", "
                                       "\"message\"}} with Centrifugo's numeric codes (104 no such method, 107 bad "
                                       "request, 108 not available in pushd, 102 bad channel)."},
}

_ID_RULES = f"Percent-decoded; non-empty, at most {api.MAX_ID_LENGTH} characters, no '/' or control characters."

PARAMETERS: dict[str, Schema] = {
    "user": {"name": "user", "in": "path", "required": True, "schema": {"type": "string"},
             "description": f"A user id. {_ID_RULES}"},
    "conn_id": {"name": "conn_id", "in": "path", "required": True, "schema": {"type": "string"},
                "description": f"A connection id. {_ID_RULES}"},
    "id": {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": f"A broadcast id. {_ID_RULES}"},
    "topic": {"name": "topic", "in": "path", "required": True, "schema": _schema("Topic"),
              "description": "A topic name, percent-decoded; a '/' in it may be sent as is or as %2F."},
    "method": {"name": "method", "in": "path", "required": True,
               "schema": {"type": "string", "enum": sorted(api_centrifugo.METHODS)},
               "description": "A method of Centrifugo's server API."},
    "job": {"name": "job", "in": "path", "required": True, "schema": {"type": "string"},
            "description": f"A job id. {_ID_RULES}"},
    "action": {"name": "action", "in": "path", "required": True,
               "schema": {"type": "string", "enum": list(api.JOB_ACTIONS)},
               "description": "confirm (after the test message), pause, resume or cancel."},
    "limit": {"name": "limit", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
    "start": {"name": "start", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0,
                                                                            "default": 0}},
    "count": {"name": "count", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1, "maximum": api.MAX_FAILURES_PAGE, "default": 1000}},
    "code": {"name": "code", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": api.CLOSE_CODES.start, "maximum": api.CLOSE_CODES.stop - 1,
                        "default": api.DEFAULT_CLOSE_CODE},
             "description": "The WebSocket close code the connections are closed with."},
    "reason": {"name": "reason", "in": "query", "required": False,
               "schema": {"type": "string", "default": api.DEFAULT_REASON},
               "description": f"The close reason: at most {api.MAX_REASON_BYTES} bytes of UTF-8."},
}


def _error(description: str, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {"application/json": {"schema": _schema("Error")}}}
    if headers:
        response["headers"] = headers
    return response


RESPONSES: dict[str, Schema] = {
    "BadRequest": _error("The body is not JSON, or a field or parameter is invalid; the message names it."),
    "Unauthorized": _error("The bearer key is missing or wrong (only when the server has API keys).",
                           {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    "Forbidden": _error("The request carries an Origin header (it comes from a web page) and api-cors-origins "
                        "does not allow that origin."),
    "NotFound": _error("No such thing."),
    "PayloadTooLarge": _error("The body is over the server's max body size (by Content-Length or actual size)."),
    "UnsupportedMediaType": _error("The Content-Type is missing or is not application/json."),
    "Conflict": _error("The job's state does not allow this action (e.g. resume a finished job)."),
    "Unavailable": _error("The cluster did not answer (Redis is down or slow); try again."),
}

_ERROR_RESPONSES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
                    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 503: "Unavailable"}


@dataclass(frozen=True, slots=True)
class _Operation:
    """What the route table does not say about an operation: its bodies, answers and query parameters."""

    responses: dict[int, tuple[str, str]]  # status -> (description, schema name)
    request: str | None = None
    query: tuple[str, ...] = ()
    not_found: bool = False
    backend: bool = True
    conflict: bool = False


OPERATIONS: dict[str, _Operation] = {
    "publish": _Operation({200: ("Published; one result, or one per message of a batch.", "PublishResult")},
                          request="PublishRequest"),
    "publishToUser": _Operation({200: ("Sent to the nodes that have the user's connections.", "UserNodes")},
                                request="UserPublishRequest"),
    "broadcast": _Operation({202: ("Accepted: the broadcast is on its way.", "BroadcastResult"),
                             200: ("A duplicate: the key was seen within the dedup window; nothing sent.",
                                   "BroadcastResult")},
                            request="BroadcastRequest"),
    "broadcastStatus": _Operation({200: ("The broadcast's status.", "BroadcastStatus")}, not_found=True),
    "topics": _Operation({200: ("Topics with subscribers.", "Topics")}),
    "topic": _Operation({200: ("The topic's subscribers per node (none: empty).", "TopicSubscribers")}),
    "nodes": _Operation({200: ("The live nodes.", "Nodes")}),
    "disconnectConnection": _Operation({200: ("The connection is being closed.", "Disconnected")},
                                       query=("code", "reason"), not_found=True),
    "disconnectUser": _Operation({200: ("The nodes were told to close the user's connections.", "UserNodes")},
                                 query=("code", "reason")),
    "centrifugo": _Operation({200: ("The method's result, or its refusal, as Centrifugo answers.",
                                    "CentrifugoReply")}, request="CentrifugoParams"),
    "createJob": _Operation({201: ("Created.", "JobCreated"),
                             200: ("The key named a job created within 24 hours: that job, nothing new.",
                                   "JobCreated")}, request="JobRequest"),
    "listJobs": _Operation({200: ("The newest jobs first.", "Jobs")}, query=("limit",)),
    "job": _Operation({200: ("The job's report.", "JobReport")}, not_found=True),
    "jobFailures": _Operation({200: ("A page of permanent failures.", "JobFailures")}, query=("start", "count"),
                              not_found=True),
    "jobAction": _Operation({200: ("The job's state after the action.", "JobState")}, not_found=True,
                            conflict=True),
    "openapi": _Operation({200: ("This document.", "OpenApiDocument")}, backend=False),
}

DESCRIPTION = """\
Publish to topics, send to users, broadcast, look at subscriptions, close connections and run push jobs over HTTP.

Every request but `GET /api/openapi.json` needs `Authorization: Bearer <key>` with one of the server's API keys;
a server configured without keys asks for none (it should then listen on loopback only). Bodies are JSON and
must be sent with `Content-Type: application/json`, at most the server's max body size. A request with an
`Origin` header (from a web page) is refused with 403 unless the server's api-cors-origins allows that origin;
then answers carry `Access-Control-Allow-Origin` and CORS preflights (`OPTIONS`) are answered. Every error
answers `{"error": {"code", "message"}}`; the message names the field at fault.
"""


def _operation(route: api.Route) -> Schema:
    spec = OPERATIONS[route.name]
    operation: Schema = {"operationId": route.name, "summary": route.summary}
    parameters = [_ref("parameters", name) for name in (*route.params, *spec.query)]
    if parameters:
        operation["parameters"] = parameters
    if spec.request is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _schema(spec.request)}}}
    responses: Schema = {str(status): {"description": description,
                                       "content": {"application/json": {"schema": _schema(schema)}}}
                         for status, (description, schema) in spec.responses.items()}
    # Any request may come from a web page, and be refused for its Origin.
    errors = {403}
    if spec.request is not None or parameters:
        errors.add(400)
    if spec.request is not None:
        errors.update((413, 415))
    if route.auth:
        errors.add(401)
    else:
        operation["security"] = []
    if spec.not_found:
        errors.add(404)
    if spec.conflict:
        errors.add(409)
    if spec.backend:
        errors.add(503)
    for status in sorted(errors):
        responses[str(status)] = _ref("responses", _ERROR_RESPONSES[status])
    operation["responses"] = responses
    return operation


def document() -> dict[str, Any]:
    """The OpenAPI document of every route in `pushd.api.ROUTES`."""
    names = [route.name for route in api.ROUTES]
    if sorted(names) != sorted(OPERATIONS):
        raise ValueError(f"pushd.openapi: routes and OPERATIONS differ: routes {sorted(set(names) - set(OPERATIONS))} "
                         f"have no operation, operations {sorted(set(OPERATIONS) - set(names))} have no route")
    paths: dict[str, dict[str, Schema]] = {}
    for route in api.ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pushd HTTP API", "version": __version__, "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "One of the server's API keys."}},
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "responses": RESPONSES,
        },
    }


def render() -> str:
    """docs/openapi.json's text: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(root: str = ".") -> int:
    Path(root, "docs", "openapi.json").write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
