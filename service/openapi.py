"""OpenAPI fragments shared by routes (error responses, the submission body)."""

from __future__ import annotations

from typing import Any

from schemas.errors import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "corrupt image",
        401: "missing or invalid API key (when keys are configured)",
        404: "unknown model, job or artifact",
        413: "too many bytes, pixels or images",
        415: "not an image / unsupported content type",
        422: "bad params",
        429: "rate limit or queue quota of the tenant reached (see Retry-After)",
        503: "Redis unavailable or no worker (see Retry-After)",
    }.items()
}

SUBMISSION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "model_id": {"type": "string"},
                        "params": {"type": "string", "description": "JSON object"},
                        "top_k": {"type": "integer"},
                        "callback_url": {"type": "string", "description": "jobs: notified when the job ends"},
                    },
                    "description": "plus the kind's extra uploads as files by name (GET /v1/methods: files), "
                    "e.g. attribution (.npy), training_set (.zip)",
                    "required": ["image"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "model_id": {"type": "string"},
                        "image_base64": {"type": "string"},
                        "images_base64": {"type": "array", "items": {"type": "string"}},
                        "params": {"type": "object"},
                        "top_k": {"type": "integer"},
                        "files_base64": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                            "description": "extra uploads by name, base64 (GET /v1/methods: files)",
                        },
                        "callback_url": {"type": "string", "description": "jobs: notified when the job ends"},
                    },
                    "additionalProperties": False,
                }
            },
        },
    }
}
