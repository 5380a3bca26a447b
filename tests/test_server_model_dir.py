"""A bad model directory fails fast: `crsm serve` (a subprocess, as users start it) on a copy of a tiny model
with one file broken exits non-zero, and its log names the file and says what is wrong with it, instead
of answering /health forever while /ready says 503."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from crsm_core.backbone import MambaLM
from crsm_core.config import tiny_config
from crsm_core.model import CRSMModel
from crsm_core.tokenizer import ByteTokenizer
from test_server import REPO, model_dir  # noqa: F401 (fixture)

EXIT_WAIT_S = 120  # a cold start imports torch: a while on a busy machine
SETPRIV = shutil.which("setpriv")


def serve_until_exit(directory: Path, as_nobody: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRSM_TORCH_THREADS": "1", "HOME": str(directory.parent)}
    command = [sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve", "--model", str(directory),
               "--port", "0", "--device", "cpu"]
    if as_nobody:
        command = [SETPRIV, "--reuid", "65534", "--regid", "65534", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=EXIT_WAIT_S)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def mismatch_shapes(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = 1000  # the embedding in the file has 264 rows
    (directory / "config.json").write_text(json.dumps(config))


BROKEN: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (how the copy is broken, the file the log must name, what it must say)
    "truncated weights": (lambda d: truncate(d / "model.safetensors"), "model.safetensors", "corrupt"),
    "garbage weights": (lambda d: garbage(d / "model.safetensors"), "model.safetensors", "corrupt"),
    "shape mismatch": (mismatch_shapes, "model.safetensors", "shape mismatch"),
    "corrupt tokenizer.json": (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "mod'),
                               "tokenizer.json", "cannot load tokenizer"),
    "truncated dynamics": (lambda d: truncate(d / "dynamics.safetensors"), "dynamics.safetensors", "corrupt"),
    "crsm.json not JSON": (lambda d: (d / "crsm.json").write_text("{lag: 3"), "crsm.json", "Expecting"),
    "crsm.json not an object": (lambda d: (d / "crsm.json").write_text("[1, 2]"), "crsm.json", "JSON object"),
    "crsm.json unknown field": (lambda d: (d / "crsm.json").write_text('{"lagg": 3}'), "crsm.json", "lagg"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BROKEN))
def test_crsm_serve_exits_naming_the_broken_file(model_dir, tmp_path, case):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    (directory / "crsm.json").write_text("{}")
    breaking, file, problem = BROKEN[case]
    breaking(directory)
    result = serve_until_exit(directory)
    assert result.returncode != 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot serve" in line]
    assert len(lines) == 1 and str(directory / file) in lines[0] and problem in lines[0], result.stderr
    assert "Traceback" not in result.stderr  # a bad file is not a bug


@pytest.mark.slow
def test_no_tokenizer_files_for_a_model_whose_vocabulary_is_not_bytes(tmp_path):
    directory = tmp_path / "model"
    CRSMModel(MambaLM(tiny_config(vocab_size=1000)), tokenizer=ByteTokenizer()).save_pretrained(directory)
    (directory / "tokenizer_config.json").unlink()
    result = serve_until_exit(directory)
    assert result.returncode != 0
    assert "neither tokenizer_config.json nor tokenizer.json found" in result.stderr
    assert "vocabulary (1000 tokens) is not the byte tokenizer's (260)" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="runs the server as nobody (root and setpriv)")
@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "tokenizer_config.json", "crsm.json", "."])
def test_an_unreadable_file_is_reported_as_unreadable(model_dir, file):
    """As root every file is readable: the server runs as nobody, on a copy it may not read one file of."""
    base = Path(tempfile.mkdtemp(prefix="crsm-model-"))  # not under pytest's tmp_path: nobody cannot enter it
    try:
        directory = base / "model"
        shutil.copytree(model_dir, directory)
        (directory / "crsm.json").write_text("{}")
        for path in [base, *directory.rglob("*"), directory]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (directory / file).chmod(0o000 if file != "." else 0o311)  # a directory: searchable, not listable
        result = serve_until_exit(directory, as_nobody=True)
        assert result.returncode != 0
        named = str(directory if file == "." else directory / file)
        lines = [line for line in result.stderr.splitlines() if "cannot serve" in line]
        assert len(lines) == 1 and f"{named}: " in lines[0], result.stderr
        assert "unreadable (permission denied)" in lines[0] and "not found" not in lines[0]
        assert "Traceback" not in result.stderr
    finally:
        shutil.rmtree(base)


def test_the_byte_tokenizer_stays_the_default_of_a_byte_model(tmp_path):
    """Without tokenizer files, a model with the byte vocabulary still loads (as `crsm init` makes them)."""
    CRSMModel(MambaLM(tiny_config()), tokenizer=ByteTokenizer()).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    model = CRSMModel.from_pretrained(tmp_path)
    try:
        assert isinstance(model.tokenizer, ByteTokenizer)
    finally:
        model.close()
