"""The compiled CUDA extension ``qadapter_kernels._C``: find it, or build it, and say whether it runs here.

The extension comes from ``pip install --no-build-isolation .`` on a machine with a CUDA build of
torch and nvcc (see setup.py); failing that, it is built just in time, on first use, from the
CUDA sources shipped inside the package (``qadapter_kernels/csrc``; ``csrc/`` in a source
checkout) with nvcc and ninja, into the package's cache (``toolchain/cache.py``; never into
site-packages), for the GPU's own architecture. ``python -m qadapter_kernels.toolchain.build_cuda``
does that build on purpose and shows the compiler's output. Importing this module never fails:
without a GPU, nvcc, ninja, a successful build or a kernel image for the device,
:func:`backend_status` says which, and what to run. The backend built on it is ``cuda_backend.py``;
its ops, ``_cuda_ops.py``.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from .toolchain import cuda_archs
from .toolchain.cache import CacheNotWritable, error_summary, sources_dir, writable_cache_dir

BUILD_COMMAND = "python -m qadapter_kernels.toolchain.build_cuda"


ARCHS_FILE = "_C_archs.txt"  # beside the compiled extension: the TORCH_CUDA_ARCH_LIST it was built for


def jit_arch_list(capability: tuple[int, int] | None) -> str:
    """The architectures of a just-in-time build: ``TORCH_CUDA_ARCH_LIST`` when set, else the
    device's own capability with PTX (for an nvcc too old for it, PTX of an older one); without a
    device, every supported one (``cuda_archs.arch_list``)."""
    from torch.utils.cpp_extension import CUDA_HOME

    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen:
        return chosen
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    cuda = cuda_archs.nvcc_version(nvcc if nvcc and os.path.isfile(nvcc) else None)
    return cuda_archs.device_arch_list(capability, cuda) if capability else cuda_archs.arch_list(cuda)


def jit_build(prebuilt_error: str = "", *, verbose: bool = False):
    """``(module, "")`` built (or found in the cache) from the shipped sources for this device, or
    ``(None, why not)``. The architectures go to nvcc as explicit flags, which torch's build cache
    keys on: a cached build for other architectures is not taken for this one."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, f"nvcc not found (install the CUDA toolkit matching torch {torch.version.cuda}, or set CUDA_HOME)"
    if shutil.which("ninja") is None:
        return None, "ninja not found: pip install ninja, then " + BUILD_COMMAND
    csrc = sources_dir()
    if csrc is None:
        return None, f"the prebuilt extension does not import ({prebuilt_error}) and no CUDA sources are installed"
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    archs = jit_arch_list(capability)
    fits, why = cuda_archs.covers(archs, capability) if capability else (True, "")
    if not fits:
        return None, f"TORCH_CUDA_ARCH_LIST does not cover this GPU: {why}; unset it or add {capability[0]}.{capability[1]}"
    try:
        build = writable_cache_dir("cuda")
        module = load(
            name="qadapter_kernels_C",
            build_directory=str(build),
            sources=[str(p) for p in sorted(csrc.glob("*.cu"))] + [str(csrc / "binding.cpp")],
            extra_include_paths=[str(csrc)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", *cuda_archs.gencode_flags(archs)],
            verbose=verbose or os.environ.get("QADAPTER_JIT_VERBOSE") == "1",
        )
    except CacheNotWritable as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any build failure disables the backend, with its reason
        return None, f"building the CUDA extension failed ({BUILD_COMMAND} shows why): {error_summary(str(exc))}"
    module.built_archs = archs
    return module, ""


def built_archs(module) -> str | None:
    """The arch list ``module`` was built for: recorded by the just-in-time build, or by setup.py
    beside the compiled extension (``_C_archs.txt``); None when unknown."""
    recorded = getattr(module, "built_archs", None)
    if recorded:
        return recorded
    where = getattr(module, "__file__", None)
    sidecar = Path(where).with_name(ARCHS_FILE) if where else None
    return (sidecar.read_text().strip() or None) if sidecar is not None and sidecar.is_file() else None


def image_status(module) -> tuple[bool, str]:
    """Whether ``module``'s kernels have an image (a cubin or PTX) the current GPU runs, and if not why.

    The recorded arch list is compared with the device's capability; then the CUDA runtime is
    asked for the row step kernel's attributes, which fails with "no kernel image is available"
    exactly when the launches would.
    """
    capability = torch.cuda.get_device_capability()
    name = f"{torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]})"
    archs = built_archs(module)
    if archs is not None:
        fits, why = cuda_archs.covers(archs, capability)
        if not fits:
            return False, f"the CUDA extension cannot run on this {name}: {why}"
    probe = getattr(module, "kernel_image", None)
    if probe is not None:
        try:
            probe()
        except RuntimeError as exc:
            return False, f"the CUDA extension has no kernel image for this {name}: {exc}"
    return True, ""


@functools.cache
def _load():
    """``(extension module, "")`` or ``(None, why not)``; built at most once per process. A prebuilt
    extension without an image for this GPU gives way to a just-in-time build for it."""
    if torch.version.cuda is None:
        return None, "torch is a CPU build (torch.version.cuda is None): the cuda backend needs a CUDA build of torch"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from . import _C
    except ImportError as exc:
        module, reason = jit_build(str(exc))
    else:
        fits, why = image_status(_C)
        if fits:
            return _C, ""
        module, reason = jit_build(why)
        if module is None:
            return None, f"{why}; a just-in-time build for it did not succeed either: {reason}"
    if module is None:
        return None, reason
    fits, why = image_status(module)
    return (module, "") if fits else (None, why)


def backend_status() -> tuple[bool, str]:
    ext, reason = _load()
    return ext is not None, reason


def extension():
    """The loaded extension module; raises with the reason when it is unavailable."""
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(f"the qadapter_kernels CUDA extension is not available: {reason}")
    return ext
