"""Training data with no downloads: the Python standard library's sources and docs, plus task examples.

The corpus is every `.py`, `.txt` and `.rst` file under `sysconfig.get_paths()["stdlib"]` (site-packages
and caches excluded), listed in a fixed order and split into train / held-out by a hash of each file's
relative path. Byte-level tokens: a file's bytes, then the end-of-text token. (The corpus is whatever
the running Python ships, so it differs a little between Python versions; the report records which.)

Training rows are packed: a row is either a window of the corpus or a run of task documents
("12+345=357<eos>...") starting at a document boundary, as a prompt starts from the zero state at
inference. Row contents depend only on (seed, step), so a resumed run sees the same batches.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import ByteTokenizer
from .config import DataConfig
from ..tasks import TaskSpec, answer, sample_prompts

log = logging.getLogger(__name__)

SUFFIXES = (".py", ".txt", ".rst")
EOS = ByteTokenizer.eos_id


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")


def list_corpus_files(root: Path, exclude_dirs: tuple[str, ...]) -> list[str]:
    """Relative paths (posix) of the corpus files under root, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs)
        for name in filenames:
            if name.endswith(SUFFIXES):
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    found.append(path.relative_to(root).as_posix())
    return sorted(found)


def is_heldout_file(rel: str, percent: int) -> bool:
    return _path_hash(rel) % 100 < percent


@dataclass
class Corpus:
    train: np.ndarray      # [N_train] uint16 token ids
    heldout: np.ndarray    # [N_heldout] uint16 token ids
    root: str
    train_files: int
    heldout_files: int

    def describe(self) -> dict:
        return {"root": self.root, "python": sys.version.split()[0], "train_files": self.train_files,
                "heldout_files": self.heldout_files, "train_tokens": int(self.train.size),
                "heldout_tokens": int(self.heldout.size)}


def _concat(root: Path, files: list[str]) -> np.ndarray:
    parts = []
    for rel in files:
        parts.append(np.frombuffer((root / rel).read_bytes(), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([EOS], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def load_corpus(cfg: DataConfig, root: Path | None = None) -> Corpus:
    """The standard-library corpus, split by path hash. With max_corpus_bytes, files are taken in hash
    order (a fixed pseudo-random sample across the whole library) until the budget is reached."""
    root = root or stdlib_root()
    files = list_corpus_files(root, cfg.exclude_dirs)
    if cfg.max_corpus_bytes:
        chosen, total = [], 0
        for rel in sorted(files, key=_path_hash):
            size = (root / rel).stat().st_size
            if total + size > cfg.max_corpus_bytes:
                continue
            chosen.append(rel)
            total += size
        files = sorted(chosen)
    train = [f for f in files if not is_heldout_file(f, cfg.heldout_percent)]
    heldout = [f for f in files if is_heldout_file(f, cfg.heldout_percent)]
    if not train or not heldout:
        raise ValueError(f"corpus under {root} has {len(train)} train and {len(heldout)} held-out files; "
                         "need both (raise data.max_corpus_bytes)")
    corpus = Corpus(_concat(root, train), _concat(root, heldout), str(root), len(train), len(heldout))
    log.info("corpus %s: %d train files (%d tokens), %d held-out files (%d tokens)", root, len(train),
             corpus.train.size, len(heldout), corpus.heldout.size)
    return corpus


def task_document(prompt: str) -> list[int]:
    """The training text of one task example: prompt, answer, end of text."""
    return list((prompt + answer(prompt)).encode()) + [EOS]


def task_row(prompts: list[str], length: int) -> np.ndarray:
    """Task documents packed back to back and cut at `length` tokens. prompts must cover length."""
    row: list[int] = []
    for prompt in prompts:
        row.extend(task_document(prompt))
        if len(row) >= length:
            return np.asarray(row[:length], dtype=np.int64)
    raise ValueError(f"{len(prompts)} prompts give only {len(row)} tokens, need {length}")


class BatchSampler:
    """Packed training batches. batch(step) -> ids [B, seq_len + 1] (inputs are [:, :-1], targets [:, 1:])."""

    def __init__(self, corpus: Corpus, tasks: TaskSpec, cfg: DataConfig, batch_size: int, seed: int):
        if corpus.train.size <= cfg.seq_len + 1:
            raise ValueError(f"train corpus ({corpus.train.size} tokens) is shorter than one row")
        self.corpus, self.tasks, self.cfg = corpus, tasks, cfg
        self.batch_size, self.seed = batch_size, seed
        # Shortest possible document is "0+0=0<eos>" (6 tokens).
        self._prompts_per_row = cfg.seq_len // 6 + 2

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        length = self.cfg.seq_len + 1
        is_task = rng.random(self.batch_size) < self.cfg.task_fraction
        rows = np.empty((self.batch_size, length), dtype=np.int64)
        n_task = int(is_task.sum())
        prompts = sample_prompts(rng, self.tasks, n_task * self._prompts_per_row, heldout=False)
        starts = rng.integers(0, self.corpus.train.size - length, size=self.batch_size)
        k = 0
        for i in range(self.batch_size):
            if is_task[i]:
                rows[i] = task_row(prompts[k * self._prompts_per_row:(k + 1) * self._prompts_per_row], length)
                k += 1
            else:
                rows[i] = self.corpus.train[starts[i]:starts[i] + length]
        return torch.from_numpy(rows)


def heldout_text_windows(corpus: Corpus, n: int, length: int) -> torch.Tensor:
    """n evenly spaced windows of the held-out corpus: ids [n, length] (the same every call)."""
    if corpus.heldout.size <= length:
        raise ValueError(f"held-out corpus ({corpus.heldout.size} tokens) is shorter than one window")
    starts = np.linspace(0, corpus.heldout.size - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([corpus.heldout[s:s + length].astype(np.int64) for s in starts]))


def heldout_task_rows(tasks: TaskSpec, n: int, length: int, seed: int) -> torch.Tensor:
    """n rows of held-out task documents: ids [n, length] (fixed for a seed)."""
    rng = np.random.default_rng([seed, 0x4E1D])
    per_row = length // 6 + 2
    prompts = sample_prompts(rng, tasks, n * per_row, heldout=True)
    return torch.from_numpy(np.stack([task_row(prompts[i * per_row:(i + 1) * per_row], length)
                                      for i in range(n)]))
