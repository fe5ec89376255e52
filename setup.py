"""Build script. Plain metadata lives in pyproject.toml; this file exists for the optional
compiled CUDA extension ``qadapter_kernels._C`` (see csrc/), which is added when a CUDA build of
torch and nvcc are present. Installing without CUDA, nvcc or a GPU always succeeds.

``QADAPTER_BUILD_CUDA=1`` requires the extension (the install fails if it cannot be built),
``QADAPTER_BUILD_CUDA=0`` skips it. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures
(default ``8.0;8.6;8.9;9.0``). Build against the installed torch: ``pip install --no-build-isolation``.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _cuda_toolchain() -> str:
    """Empty if the sources, a CUDA build of torch and nvcc are here, else why the extension cannot be built."""
    if not (ROOT / "csrc" / "binding.cpp").is_file():
        return "csrc/ is not in this source tree"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return ""


def _extension_args() -> dict:
    mode = os.environ.get("QADAPTER_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"QADAPTER_BUILD_CUDA must be 0 or 1; got {mode!r}")
    if mode == "0":
        return {}
    missing = _cuda_toolchain()
    if missing:
        if mode == "1":
            raise SystemExit(f"QADAPTER_BUILD_CUDA=1 but the CUDA extension cannot be built: {missing}")
        print(f"qadapter-kernels: building without the CUDA extension: {missing}")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")) + ["csrc/binding.cpp"]
    ext = CUDAExtension(
        "qadapter_kernels._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_args())
