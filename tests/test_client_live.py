"""The Python client and its CLI against the real CRSM server (uvicorn on 127.0.0.1, tiny model)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from clients.client import AsyncCRSMClient, CRSMClient
from clients.types import DoneEvent, InjectionEvent, TokenEvent
from test_server import LiveServer, settings_for  # the server fixtures' own helpers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from crsm_core.backbone import MambaLM
    from crsm_core.config import tiny_config
    from crsm_core.model import CRSMModel
    from crsm_core.tokenizer import ByteTokenizer

    directory = tmp_path_factory.mktemp("client-model")
    torch.manual_seed(0)
    model = CRSMModel(MambaLM(tiny_config()), tokenizer=ByteTokenizer())
    model.save_pretrained(directory)
    model.close()
    live = LiveServer(settings_for(directory)).start()
    yield live
    live.stop()


def test_sync_stream_equals_the_non_streaming_answer(server):
    with CRSMClient(server.url) as client:
        assert client.health() and client.ready()
        whole = client.generate("Hello", max_tokens=10, seed=3, temperature=0.7)
        with client.stream("Hello", max_tokens=10, seed=3, temperature=0.7) as events:
            events = list(events)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.usage.completion_tokens == len(tokens) == whole.usage.completion_tokens == 10
    assert [t.token_id for t in tokens] == whole.token_ids
    assert "".join(t.text for t in tokens) == whole.text


async def test_async_client_with_deliberation_reports_every_injection(server):
    async with AsyncCRSMClient(server.url) as client:
        stream = await client.stream("The", max_tokens=24, seed=1, deliberation={"enabled": True, "lag": 2})
        async with stream as events:
            received = [e async for e in events]
    injections = [e for e in received if isinstance(e, InjectionEvent)]
    done = received[-1]
    assert isinstance(done, DoneEvent) and done.deliberation is not None
    resolved = sum(done.deliberation[k] for k in ("applied", "applied_late", "pruned", "vetoed", "rejected"))
    assert resolved == len(injections)


def test_cli_streams_from_the_server(server):
    result = subprocess.run([sys.executable, "-m", "clients.cli", "--url", server.url, "generate", "Hi", "--stream",
                             "--max-tokens", "6", "--seed", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with CRSMClient(server.url) as client:
        expected = client.generate("Hi", max_tokens=6, seed=2)
    assert expected.text in result.stdout
