"""The OpenAPI 3 document of the HTTP routes, served at ``/openapi.json`` (the original REST service had one).

The tests validate it against the OpenAPI 3.1 schema and compare its paths
with the routes the listener actually serves.
"""

from __future__ import annotations

from typing import Any

from petsage_grpc import __version__

_TEXT = "text/plain; charset=utf-8"
_HEALTH_TEXT = {_TEXT: {"schema": {"type": "string"}}}

_CHECK_RESULT = {
    "type": "object",
    "required": ["name", "status", "detail", "duration_seconds", "critical"],
    "properties": {
        "name": {"type": "string", "examples": ["logging"]},
        "status": {"type": "string", "enum": ["ok", "failing"]},
        "detail": {"type": "string"},
        "duration_seconds": {"type": "number"},
        "critical": {"type": "boolean"},
    },
}
_SMOKE = {
    "type": "object",
    "required": ["status", "message", "timestamp"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded", "failing"]},
        "message": {"type": "string", "examples": ["PetSage services are running and logging is active."]},
        "timestamp": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"},
        "checks": {"type": "array", "items": {"$ref": "#/components/schemas/CheckResult"},
                   "description": "with --smoke-details full only"},
        "server": {"$ref": "#/components/schemas/ServerInfo"},
    },
}
_SERVER_INFO = {
    "type": "object",
    "description": "with --smoke-details full only",
    "required": ["version", "instance_id", "start_time"],
    "properties": {"version": {"type": "string"}, "instance_id": {"type": "string"},
                   "start_time": {"type": "string", "format": "date-time"}},
}
_HEALTH_STATUS = {"type": "object", "required": ["status"],
                  "properties": {"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}}}
_ERROR = {"type": "object", "required": ["code", "message"],
          "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                         "details": {"type": "array", "items": {"type": "object"}}}}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": _HEALTH_TEXT}


def _get(summary: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A path item answering GET (and HEAD, the same without a body)."""
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    head = {**operation, "summary": f"{summary} (headers only)",
            "responses": {code: {"description": r["description"]} for code, r in responses.items()}}
    return {"get": operation, "head": head}


def _health_endpoint(name: str, what: str) -> dict[str, Any]:
    parameters = [
        {"name": "verbose", "in": "query", "required": False, "allowEmptyValue": True,
         "description": "list each check, one [+]/[-] line each", "schema": {"type": "string"}},
        {"name": "exclude", "in": "query", "required": False, "description": "a check to leave out; repeatable",
         "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True},
    ]
    return _get(f"{what}: the Kubernetes API server's /{name} contract", {
        "200": _text("every check passes: 'ok', or with ?verbose one line per check and "
                     f"'{name} check passed'"),
        "500": _text(f"a check fails: one line per check, then '{name} check failed'"),
    }, parameters)


def _one_check(name: str) -> dict[str, Any]:
    parameter = {"name": "check", "in": "path", "required": True, "schema": {"type": "string"}}
    return _get(f"one check of /{name}", {
        "200": _text("it passes: 'ok'"),
        "404": _text("no check of that name here"),
        "500": _text("it fails: 'internal server error: REASON'"),
    }, [parameter])


def document(*, metrics: bool) -> dict[str, Any]:
    """The document: every route the listener serves (``/metrics`` only when ``metrics``)."""
    paths: dict[str, Any] = {
        "/api/v1/smoke-test/": _get("run the smoke test: write a tagged record through every log sink", {
            "200": _json("SmokeTest", "status ok or degraded"),
            "503": _json("SmokeTest", "status failing, or the server is shutting down"),
        }),
        "/livez": _health_endpoint("livez", "whether the process should be restarted"),
        "/readyz": _health_endpoint("readyz", "whether the instance should receive traffic"),
        "/healthz": _health_endpoint("healthz", "the overall status"),
        "/livez/{check}": _one_check("livez"),
        "/readyz/{check}": _one_check("readyz"),
        "/healthz/{check}": _one_check("healthz"),
        "/health": _get("any grpc.health.v1 name, as grpc-gateway maps it", {
            "200": _json("HealthStatus", "SERVING"),
            "503": _json("HealthStatus", "NOT_SERVING"),
            "404": _json("Error", "an unknown service name"),
        }, [{"name": "service", "in": "query", "required": False, "schema": {"type": "string", "default": ""},
             "description": "a health name: '' (overall), liveness, readiness, a served service"}]),
        "/openapi.json": _get("this document", {"200": {"description": "OpenAPI 3.1",
                                                        "content": {"application/json": {}}}}),
    }
    if metrics:
        paths["/metrics"] = _get("Prometheus metrics", {"200": {
            "description": "the Prometheus text format (OpenMetrics when asked for)",
            "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}}})
    return {
        "openapi": "3.1.0",
        "info": {"title": "PetSage health and smoke test over HTTP", "version": __version__,
                 "description": "The HTTP side of petsage-grpc: the same health model as its gRPC services."},
        "paths": paths,
        "components": {"schemas": {"SmokeTest": _SMOKE, "CheckResult": _CHECK_RESULT, "ServerInfo": _SERVER_INFO,
                                   "HealthStatus": _HEALTH_STATUS, "Error": _ERROR}},
    }
