"""The chat template for base models.

A conversation is rendered as plain text, one block per message, and the prompt ends with the
assistant's turn opened, so that a base model simply continues the transcript:

    System: You are terse.

    User: What is 2+2?

    Assistant: 4

    User: And 3+3?

    Assistant:

Roles are written `System` (system and developer messages), `User` and `Assistant`; each block is
`<Role>: <content>` followed by a blank line. Generation stops when the model starts another
user or system turn (`CHAT_STOPS`); the reply is the model's text as it is (usually with a leading
space, since the prompt ends at the colon).
"""
from __future__ import annotations

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ("\nUser:", "\nSystem:")


def render_chat(messages: list[tuple[str, str]]) -> str:
    """messages: (role, text) pairs -> the prompt text."""
    blocks = [f"{ROLE_NAMES[role]}: {text.strip()}\n\n" for role, text in messages]
    return "".join(blocks) + "Assistant:"
