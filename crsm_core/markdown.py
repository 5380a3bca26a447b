"""Generated sections of hand-written documents.

A command that measures something (`crsm eval`, `crsm bench`) owns the text between its two marker
comments in a document under docs/ and nothing else: notes written by hand around the markers survive
every rerun.
"""
from __future__ import annotations

from pathlib import Path


def write_generated_section(path: Path, body: str, begin: str, end: str, heading: str = "") -> None:
    """Put `body` between the `begin` and `end` marker lines of the markdown file at `path`.

    - The file has both markers: the text between them is replaced, the text around them kept.
    - The file exists without them: the marked block is appended (nothing already there is lost).
    - No file: it is created as `heading` followed by the marked block.
    """
    block = f"{begin}\n{body}\n{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text.split(begin, 1)[1]:
            before = text.split(begin, 1)[0]
            after = text.split(begin, 1)[1].split(end, 1)[1]
            content = f"{before}{block}{after}"
        else:
            content = f"{text.rstrip()}\n\n{block}\n"
    else:
        content = f"{heading}{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
