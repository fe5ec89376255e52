"""The compiled CPU row step: ``csrc/cpu_row_step.c`` built just in time with the system C compiler.

:func:`cpu_row_step` has the ``steps.RowStep`` contract and reads each ``[C, V]`` buffer once
(the eager step makes several passes); ``chunked_token_stats`` uses it by default for CPU tensors
when :func:`status` says it is available. The library is built on first use with ``$CC``, else
``cc`` or ``gcc`` from PATH (``-O3 -march=native -fopenmp``; without OpenMP if that fails) into
the package's cache (``toolchain/cache.py``: ``$QADAPTER_CACHE/cpu`` by default), under a name keyed by the source, compiler, flags and CPU, so later processes just load it.

``QADAPTER_CPU_KERNELS=0`` switches it off (the eager step is used; :func:`status` says so).
Without a compiler or with a failed build the eager step is used and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .steps import FILTER_BLOCK, kernel_block_stats, torch_block_step, torch_row_step
from .toolchain.cache import CacheNotWritable, cache_dir, error_summary, sources_dir, writable_cache_dir

ENV_SWITCH = "QADAPTER_CPU_KERNELS"
SOURCE = "cpu_row_step.c"
# -fno-trapping-math lets gcc turn the portable exp's float compares into vector selects: without
# it that loop runs scalar (far slower where there is no AVX-512). Nothing reads FP exceptions.
BASE_FLAGS = ("-std=c11", "-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fPIC", "-shared")
# Tried in order: -fopenmp-simd keeps the `omp simd` reductions vectorised without the runtime.
FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native", "-fopenmp-simd"), ("-fopenmp-simd",))
DTYPES = (torch.float32, torch.bfloat16)  # what the compiled step takes; others take the eager one
_P = ctypes.c_void_p


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc")


def _cpu_id() -> str:
    """-march=native code must not be reused on another CPU (a cache on a shared home directory)."""
    try:
        return next((line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(cc: str, source: Path, flags: tuple[str, ...]) -> tuple[Path | None, str]:
    key = hashlib.sha256("\0".join([source.read_text(), cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    target = cache_dir("cpu") / f"cpu_row_step-{key}.so"
    if target.is_file():  # a read-only cache that holds the build serves as well
        return target, ""
    writable_cache_dir("cpu")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # built aside, then renamed: atomic
    os.close(fd)
    try:
        run = subprocess.run([cc, *BASE_FLAGS, *flags, "-o", tmp, str(source), "-lm"],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            return None, error_summary(run.stderr or run.stdout) or f"{cc} exited with status {run.returncode}"
        os.replace(tmp, target)
        return target, ""
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load():
    """``(library, "")`` or ``(None, why not)``; built (or found in the cache) once per process."""
    cc, csrc = compiler(), sources_dir()
    if cc is None:
        return None, "no C compiler (set CC, or put cc/gcc on PATH)"
    if csrc is None or not (csrc / SOURCE).is_file():
        return None, f"{SOURCE} is not installed with the package"
    errors = []
    for flags in FLAG_SETS:
        try:
            path, error = _build(cc, csrc / SOURCE, flags)
            lib = ctypes.CDLL(str(path)) if path else None
        except CacheNotWritable as exc:  # the same for every set of flags
            return None, str(exc)
        except (OSError, subprocess.SubprocessError) as exc:
            lib, error = None, str(exc)
        if lib is not None:
            fn = lib.qak_cpu_row_step
            fn.restype = ctypes.c_int
            fn.argtypes = [_P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_float, ctypes.c_float, ctypes.c_float, _P, _P, _P, _P, _P, ctypes.c_int]
            if lib.qak_cpu_block_width() != FILTER_BLOCK:
                return None, f"{SOURCE} sweeps blocks of {lib.qak_cpu_block_width()}, steps.FILTER_BLOCK is {FILTER_BLOCK}"
            return fn, ""
        errors.append(f"{' '.join(flags)}: {error}")
    return None, "building csrc/cpu_row_step.c failed: " + " || ".join(errors)


@torch.compiler.disable  # under torch.compile: run as is, never traced (ctypes, a build, a cache)
def status() -> tuple[bool, str]:
    """``(True, "")`` when the compiled row step is used, else ``(False, why not)``."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False, f"switched off ({ENV_SWITCH}=0)"
    fn, reason = _load()
    return fn is not None, reason


def _compiled_fits(z: torch.Tensor, q: torch.Tensor, p_dtype: torch.dtype) -> bool:
    """CPU float32 / bfloat16 matrices of one dtype and shape, and a built library."""
    ok = z.device.type == "cpu" and q.device.type == "cpu" and z.dtype == q.dtype and z.shape == q.shape
    return ok and q.dtype in DTYPES and p_dtype in DTYPES and q.dim() == 2 and status()[0]


def _sweep(z, q, targets, alpha_tilde, alpha_0, p_dtype, outputs: tuple[str, ...], block_stats=None, softcap=None):
    """One call of the C step; ``outputs`` names the ``[rows]`` float32 results wanted, of
    ``q_taken`` (with ``targets``), ``value``, ``lse_c``, ``lse_z``. Returns them and ``p``; fills
    ``block_stats`` when given (``steps.BlockStep``). Under ``softcap`` the step caps z and q as it
    reads them (0 tells it there is no cap)."""
    z, q = z.contiguous(), q.contiguous()
    rows, vocab = q.shape
    p = q if p_dtype == q.dtype else torch.empty(rows, vocab, dtype=p_dtype, device="cpu")
    wanted = {name: torch.empty(rows, dtype=torch.float32, device="cpu") for name in outputs}
    pointer = {name: out.data_ptr() for name, out in wanted.items()}
    if targets is not None:
        targets = targets.to(torch.int64).contiguous()
    rc = _load()[0](z.data_ptr(), q.data_ptr(), None if targets is None else targets.data_ptr(), p.data_ptr(),
                    q.dtype == torch.bfloat16, p_dtype == torch.bfloat16, rows, vocab, alpha_tilde, alpha_0,
                    0.0 if softcap is None else softcap,
                    *(pointer.get(name) for name in ("q_taken", "value", "lse_c", "lse_z")),
                    None if block_stats is None else kernel_block_stats(block_stats, rows, vocab).data_ptr(),
                    torch.get_num_threads())
    if rc != 0:
        raise MemoryError("cpu_row_step: could not allocate its per-thread scratch rows")
    return (*wanted.values(), p)


@torch.compiler.disable  # under torch.compile: run as is, never traced (ctypes, a build, a cache)
def cpu_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap=None, block_stats=None):
    """The ``steps.RowStep`` contract in one sweep; p overwrites q when p_dtype is q's dtype.

    Under a soft cap it caps z, q and the target's Q as it reads them. CPU float32 / bfloat16 only;
    anything else (float64, float16, CUDA) takes the eager step.
    """
    if not _compiled_fits(z, q, p_dtype):
        return torch_row_step(z, q, targets, alpha_tilde, alpha_0, p_dtype, softcap, block_stats)
    return _sweep(z, q, targets, alpha_tilde, alpha_0, p_dtype, ("q_taken", "value"), block_stats, softcap=softcap)


@torch.compiler.disable
def cpu_block_step(z, q, alpha_tilde, alpha_0, p_dtype, block_stats=None, softcap=None):
    """The ``steps.BlockStep`` contract in one sweep (a vocabulary tile); p overwrites q when
    p_dtype is q's dtype; ``block_stats`` come from the sweep's own block scales and sums, at no
    extra pass; a soft cap is applied as it reads. Anything but CPU float32 / bfloat16 takes the eager step."""
    if not _compiled_fits(z, q, p_dtype):
        return torch_block_step(z, q, alpha_tilde, alpha_0, p_dtype, block_stats, softcap)
    return _sweep(z, q, None, alpha_tilde, alpha_0, p_dtype, ("lse_c", "lse_z"), block_stats, softcap)


@functools.cache
def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The largest CPU cache (Linux sysfs), which sizes the chunked backend's vocabulary tiles;
    ``default`` where the system does not say. Read once per process: every loss call asks."""
    units, sizes = {"K": 2**10, "M": 2**20, "G": 2**30}, []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=default)
