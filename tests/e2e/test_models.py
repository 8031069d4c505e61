"""Health and model listing."""

from __future__ import annotations

import openai

from e2e_support import MODEL, httpx


def test_health_returns_200(tokenmill_server) -> None:
    """GET /health answers 200 once the server is up."""
    response = httpx.get(f"{tokenmill_server.root}/health", timeout=10)
    assert response.status_code == 200


def test_models_list_contains_smollm2(client: openai.OpenAI) -> None:
    """The SDK's models.list() shows the served model id "smollm2"."""
    models = list(client.models.list())
    assert MODEL in [m.id for m in models]
    served = next(m for m in models if m.id == MODEL)
    assert served.object == "model"


def test_models_list_raw_shape(http: httpx.Client) -> None:
    """GET /v1/models returns {"object": "list", "data": [{"id", "object": "model", ...}]}."""
    response = http.get("/models")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["object"] == "list"
    assert isinstance(body["data"], list)
    entry = next(m for m in body["data"] if m["id"] == MODEL)
    assert entry["object"] == "model"
