"""Makes the setup.py of mamba-ssm / causal-conv1d compile for $TORCH_CUDA_ARCH_LIST only.

Their setup.py files pass a fixed list of `-gencode` pairs to nvcc (sm_75 ... sm_121), so the build
compiles every kernel for every one of those GPUs, and torch's TORCH_CUDA_ARCH_LIST is ignored
(torch adds its own arch flags only when none are given). Removing the fixed pairs lets
TORCH_CUDA_ARCH_LIST decide: "9.0" builds for H100/H200 alone, in a fraction of the time.

    python cuda_arch_only.py path/to/setup.py [...]

Fails when a file has no such pairs, so a new upstream layout cannot silently build everything.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# cc_flag.append("-gencode")  followed by  cc_flag.append("arch=compute_90,code=sm_90")
GENCODE_PAIR = re.compile(
    r'cc_flag\.append\(\s*"-gencode"\s*\)\s*\n\s*cc_flag\.append\(\s*"arch=compute_\w+,code=sm_\w+"\s*\)')


def patch(source: str) -> tuple[str, int]:
    """Returns the source with every fixed -gencode pair replaced by `pass`, and their count."""
    return GENCODE_PAIR.subn("pass", source)


def main(paths: list[str]) -> int:
    for path in map(Path, paths):
        patched, count = patch(path.read_text())
        if count == 0:
            sys.stderr.write(f"{path}: no fixed -gencode pairs found; update this script\n")
            return 1
        compile(patched, str(path), "exec")   # still valid Python
        path.write_text(patched)
        sys.stderr.write(f"{path}: removed {count} fixed -gencode pairs\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
