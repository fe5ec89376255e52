"""The GPU architectures the CUDA extension is built for by default, from the nvcc at hand.

Kept free of imports beyond the standard library: ``setup.py`` reads it before anything is built.
Every generation the kernels support that nvcc can target, consumer parts included, with PTX for
the newest so that later GPUs compile it at load time.
"""

from __future__ import annotations

import re
import shutil
import subprocess

# (compute capability, first CUDA release whose nvcc targets it)
SUPPORTED = (("8.0", (11, 0)), ("8.6", (11, 1)), ("8.9", (11, 8)), ("9.0", (11, 8)), ("10.0", (12, 8)),
             ("12.0", (12, 8)))


def nvcc_version(nvcc: str | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of nvcc's CUDA release, or None when there is no nvcc."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def default_archs(cuda: tuple[int, int] | None) -> list[str]:
    """The capabilities to build for with this CUDA release (all of them when it is unknown)."""
    return [arch for arch, since in SUPPORTED if cuda is None or cuda >= since]


def arch_list(cuda: tuple[int, int] | None) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for this CUDA release: every supported capability, PTX for the last."""
    archs = default_archs(cuda)
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])
