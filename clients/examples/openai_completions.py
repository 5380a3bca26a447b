"""Completions through the official `openai` client, pointed at a CRSM server.

    python clients/examples/openai_completions.py ["prompt"]

The server speaks OpenAI's /v1/completions; any OpenAI-compatible tool works the same way. Set
CRSM_OPENAI_BASE_URL to reach another server (default http://127.0.0.1:8000/v1). The server needs
no API key, but the client insists on one, so any string does.
"""
from __future__ import annotations

import os
import sys

from openai import OpenAI

BASE_URL = os.environ.get("CRSM_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")


def main(prompt: str = "Once upon a time", base_url: str = BASE_URL) -> str:
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=2)
    model = client.models.list().data[0].id

    completion = client.completions.create(model=model, prompt=prompt, max_tokens=32,
                                           temperature=0.0, seed=0)
    print(f"[{model}] {prompt}{completion.choices[0].text}")
    print(f"finish_reason={completion.choices[0].finish_reason} usage={completion.usage}")

    # Streaming: chunks arrive as the server generates them; the last one carries the usage.
    streamed = []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0.0,
                                       seed=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            streamed.append(chunk.choices[0].text)
            print(chunk.choices[0].text, end="", flush=True)
        elif chunk.usage is not None:
            print(f"\nusage={chunk.usage}")
    return "".join(streamed)


if __name__ == "__main__":
    main(*sys.argv[1:2])
