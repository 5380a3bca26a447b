"""Reading a model directory's files: a failure names the file and says what is wrong with it (not found,
unreadable, not a directory), so that a server that cannot load its model says which file to fix."""
from __future__ import annotations

import os
import stat
from pathlib import Path


def os_problem(error: OSError) -> str:
    """What an OSError says about a file, in words."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "unreadable (permission denied)"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not a file"
    return f"unreadable ({error.strerror or error})"


def read_text(path: Path, error: type[Exception]) -> str:
    """The file's text; `error(message naming the file)` when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: {os_problem(e)}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def check_directory(path: Path, error: type[Exception]) -> None:
    """`error` unless `path` is a directory this process may list and read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise error(f"{path}: model directory not found") from e
    except OSError as e:
        raise error(f"{path}: model directory {os_problem(e)}") from e
    if not stat.S_ISDIR(mode):
        raise error(f"{path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise error(f"{path}: model directory unreadable (permission denied)")
