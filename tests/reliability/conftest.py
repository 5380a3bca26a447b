"""Fixtures of the reliability suite. Its measured figures are printed at the end of the run and, when
CRSM_RELIABILITY_FIGURES names a file, written there as JSON (docs/reliability.md quotes them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness import FIGURES, Figures, make_model_dir

FIGURES_ENV = "CRSM_RELIABILITY_FIGURES"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("reliability") / "tiny")


@pytest.fixture(scope="session")
def figures() -> Figures:
    return FIGURES


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process servers and models: one intra-op thread (tiny ops gain nothing from more, and
    the clients of these tests need the other core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES.values:
        return
    terminalreporter.section("reliability figures")
    for test, numbers in FIGURES.values.items():
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))
    path = os.environ.get(FIGURES_ENV)
    if path:
        Path(path).write_text(json.dumps(FIGURES.values, indent=2) + "\n")
