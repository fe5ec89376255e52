"""What every Triton kernel of the package shares: interpreter mode, input checks, the soft cap.

The kernels are decorated with ``triton.jit`` when their module is imported, and Triton decides
*then* whether they are compiled for a GPU or run by its CPU interpreter (``TRITON_INTERPRET=1``).
:data:`INTERPRET` records that decision once, so availability checks and block sizes agree with
how the kernels were actually built. To interpret, the variable must be set before *triton* is
first imported, by anything (:func:`interpreter_problem`).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch
import triton
import triton.language as tl

_knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older versions read the environment
INTERPRET: bool = bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_problem() -> str:
    """Why interpreted kernels would fail here, or "" when they can run (or are not interpreted).

    ``triton.language``'s own helpers (``tl.zeros``, ``tl.max``, ...) are ``triton.jit`` functions
    too, built when ``triton.language`` is first imported. If some other package imported triton
    before ``TRITON_INTERPRET=1`` was set, they were built for the compiler and an interpreted
    kernel cannot call them.
    """
    if INTERPRET and isinstance(tl.zeros, triton.runtime.jit.JITFunction):
        return (
            "TRITON_INTERPRET=1 was set after triton had been imported (by another package), so "
            "triton.language was built for the compiler; set it before anything imports triton"
        )
    if INTERPRET:
        return interpreter_numpy_problem(triton.__version__, _numpy_version())
    return ""


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``3.6.0`` or ``2.4.0rc1``."""
    parts = re.findall(r"\d+", version)[:2]
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def _numpy_version() -> str:
    try:
        import numpy
    except ImportError:
        return "0"
    return numpy.__version__


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str:
    """Why this triton's interpreter cannot run with this numpy, or "".

    Triton < 3.7's interpreter turns a scalar held as a one-element array into a Python int with
    ``int(array)``, which numpy 2.4 made an error (deprecated since 1.25): every kernel with a
    runtime loop bound would fail.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"the Triton interpreter of triton {triton_version} needs numpy < 2.4 (numpy {numpy_version} "
            "refuses int() of a one-element array, which triton < 3.7 relies on): "
            "pip install 'numpy<2.4' or triton >= 3.7"
        )
    return ""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_inputs(what: str, *tensors: torch.Tensor) -> None:
    """Clear errors for what the kernels cannot take: float64, or CPU tensors outside the interpreter.

    The kernels compute every statistic in float32 (tensor-core dots accumulate in float32);
    Triton has no float64 tensor-core path, and silently rounding a float64 caller would hide
    the precision they asked for. float64 is served exactly by the ``chunked`` and
    ``reference`` backends.
    """
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"the Triton {what} takes float16, bfloat16 or float32 tensors; got {t.dtype} "
                "(use backend='chunked' or 'reference' for float64)"
            )
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"the Triton {what} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                f"first imported, to run on CPU); got a tensor on {t.device}"
            )


def launch_guard(tensor: torch.Tensor):
    """Makes ``tensor``'s GPU the current device for a kernel launch (Triton launches on the
    current device, so tensors on ``cuda:1`` with ``cuda:0`` current would otherwise be read
    by a kernel running on the wrong GPU). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and columns contiguously."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)``, tanh as the CPU step computes it (after Cephes, from exp, which every
    Triton backend has): below ``|y| = 0.625`` an odd polynomial, above ``(1 - e) / (1 + e)`` with
    ``e = exp(-2|y|)``. Any form through ``exp(2y) - 1`` alone would keep only the absolute precision
    of its ``1``, and lose a small ``y``'s digits (every logit, under a large cap)."""
    y = x / cap
    a = tl.abs(y)
    a2 = a * a
    e = tl.exp(-2.0 * a)
    r = ((((-5.70498872745e-3 * a2 + 2.06390887954e-2) * a2 - 5.37397155531e-2) * a2 + 1.33314422036e-1) * a2
         - 3.33332819422e-1)
    t = tl.where(a < 0.625, r * a2 * a + a, (1.0 - e) / (1.0 + e))
    return cap * tl.where(y < 0, -t, t)


@triton.jit
def soft_cap_slope(q, cap):
    """``d capped / d raw = 1 - tanh^2 = 1 - (capped / cap)^2``, from the capped value."""
    u = q / cap
    return 1.0 - u * u
