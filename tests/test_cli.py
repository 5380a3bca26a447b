"""The `crsm` console commands, run as a user runs them (a subprocess), and the packages' layering."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from crsm_core.config import tiny_config
from crsm_core.state import RecurrentState

REPO = Path(__file__).resolve().parent.parent


def crsm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crsm", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    assert crsm("init", "--out", str(out)).returncode == 0
    return out


@pytest.mark.slow
def test_info_prints_config_parameters_and_state_bytes(model_dir):
    result = crsm("info", "--model", str(model_dir))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    config = tiny_config()
    assert info["config"]["d_model"] == config.d_model and info["config"]["n_layer"] == config.n_layer
    assert info["state_bytes_per_session"] == RecurrentState.bytes_per_row(config)
    assert info["parameters"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--deliberation", "--lag", "2"]], ids=["plain", "deliberation"])
def test_generate_streams_a_completion(model_dir, extra):
    args = ("generate", "--model", str(model_dir), "--max-tokens", "12", "--seed", "5", "--temperature", "0",
            "Hello")
    first = crsm(*args, *extra)
    assert first.returncode == 0, first.stderr
    assert "finish_reason=length" in first.stderr
    assert "completion_tokens=12" in first.stderr
    if not extra:  # greedy and no planner timing involved: reproducible to the byte
        assert crsm(*args).stdout == first.stdout
    else:
        assert "'launched': " in first.stderr


@pytest.mark.slow
def test_missing_model_is_a_clear_error(tmp_path):
    result = crsm("info", "--model", str(tmp_path / "none"))
    assert result.returncode != 0
    assert "model directory not found" in result.stderr


def absolute_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package, above", [("crsm_core", {"server", "crsm"}), ("server", {"crsm"})])
def test_no_package_imports_one_above_it(package, above):
    """crsm (the command) sits on server, which sits on crsm_core; nothing imports upwards."""
    modules = sorted((REPO / package).rglob("*.py"))
    assert len(modules) > 5
    upward = {str(m.relative_to(REPO)): sorted(n for n in absolute_imports(m) if n.split(".")[0] in above)
              for m in modules}
    assert {m: names for m, names in upward.items() if names} == {}


# What a subcommand needs is imported when it runs: none of this at startup.
HEAVY = ("torch", "numpy", "safetensors", "tokenizers", "fastapi", "starlette", "uvicorn", "httpx", "yaml")
LIGHT_OURS = {"crsm", "crsm.cli", "crsm_core", "crsm_core.cli", "crsm_core.config", "crsm_core.files",
              "crsm_core.engine_config", "crsm_core.bench", "crsm_core.bench.cli", "crsm_core.bench.settings", "crsm_core.training",
              "crsm_core.training.cli", "server", "server.settings"}


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["bench", "--help"], ["train", "--help"]])
def test_help_imports_no_torch_server_or_training(argv):
    code = ("import json, runpy, sys\n"
            f"sys.argv = ['crsm', *{argv!r}]\n"
            "try:\n"
            "    runpy.run_module('crsm', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: crsm" in result.stdout
    modules = json.loads(result.stderr.strip().splitlines()[-1])
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []
    ours = {m for m in modules if m.split(".")[0] in ("crsm", "crsm_core", "server")}
    assert ours <= LIGHT_OURS, sorted(ours - LIGHT_OURS)
    assert "crsm.cli" in ours  # the check looked at the command's own process
