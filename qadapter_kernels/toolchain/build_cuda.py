"""Builds the CUDA extension after a plain install: ``python -m qadapter_kernels.toolchain.build_cuda``.

For installs made with build isolation (``pip install qadapter-kernels`` or from a git URL), where
torch was not there to build against: compiles the shipped sources with this machine's torch,
nvcc and ninja into the package's cache, shows the compiler's output, and says whether the
``cuda`` backend is now available. Later imports find the cached build.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .._cuda import jit_build
from .cache import sources_dir


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m qadapter_kernels.toolchain.build_cuda", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if torch.version.cuda is None:
        print("torch is a CPU build: install a CUDA build of torch first (https://pytorch.org)")
        return 1
    print(f"building from {sources_dir()} with torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    module, reason = jit_build(verbose=True)
    print("the cuda backend is available" if module is not None else f"not built: {reason}")
    return 0 if module is not None else 1


if __name__ == "__main__":
    sys.exit(main())
