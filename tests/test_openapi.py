"""/openapi.json tells the truth: schemathesis, every check, against a real uvicorn serving a tiny random
model. Bodies the schema allows are accepted, bodies it refuses are refused (400), every status and
content type an operation answers with is documented with its body (the OpenAI error shape, /metrics'
text, the SSE events)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_server import LiveServer, model_dir, one_torch_thread, settings_for  # noqa: F401 (fixtures)

EXAMPLES = 25       # per operation and phase: about a minute for every operation on a 2-core machine
SEED = 16           # the same cases on every run, so that a failure reproduces


@pytest.fixture(scope="module")
def live(model_dir):  # noqa: F811
    # short answers, so that the generated requests finish quickly; the other limits are the defaults
    server = LiveServer(settings_for(model_dir, max_new_tokens=8, max_prompt_tokens=4096, default_max_tokens=4,
                                     max_sessions=8, queue_size=64)).start()
    yield server
    server.stop()


def test_the_schema_documents_errors_not_fastapis_422(live):
    schema = httpx.get(live.url + "/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert completions["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # this deployment's limits
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 8


@pytest.mark.slow
def test_schemathesis_finds_nothing(live, tmp_path):
    st = Path(sys.executable).parent / "st"
    run = subprocess.run([str(st), "run", live.url + "/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
                          "--seed", str(SEED), "--workers", "1", "--no-color"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)   # (its crash files)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout
