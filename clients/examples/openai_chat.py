"""Chat completions through the official `openai` client, pointed at a CRSM server.

    python clients/examples/openai_chat.py ["question"]

The served model is a base model; the server renders the messages with its documented chat
template. Set CRSM_OPENAI_BASE_URL to reach another server (default http://127.0.0.1:8000/v1).
"""
from __future__ import annotations

import os
import sys

from openai import OpenAI

BASE_URL = os.environ.get("CRSM_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")


def main(question: str = "What is 12 + 30?", base_url: str = BASE_URL) -> str:
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=2)
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": question},
    ]

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=32,
                                           temperature=0.0, seed=0)
    print(f"assistant: {reply.choices[0].message.content}")

    # Streaming: each chunk carries a delta of the assistant's message.
    pieces = []
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=32,
                                            temperature=0.0, seed=0, stream=True)
    print("assistant (streamed): ", end="")
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return "".join(pieces)


if __name__ == "__main__":
    main(*sys.argv[1:2])
